"""Flow-GRPO's step, log-prob, KL and loss against the maths written out here in float64 (never the module's code)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from uae_fast.rl.flow_grpo import SDEStep, flow_grpo_loss, sde_step, transition_logprob

SHAPE = (3, 4, 6, 6)  # [B, C, h, w]
A = 0.7  # noise_level

# (sigma, sigma_next): first step, middle, last (sde only: cps has no density there), near 0, near 1.
STEPS = {
    "first": (1.0, 0.95),
    "middle": (0.6, 0.55),
    "last": (0.05, 0.0),
    "near0": (1e-4, 5e-5),
    "near0_last": (1e-4, 0.0),
    "near1": (1 - 1e-6, 0.97),
}
CASES = [(t, k) for t in ("sde", "cps") for k in STEPS if not (t == "cps" and STEPS[k][1] == 0.0)]


def _inputs(seed=0, shape=SHAPE, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


def _gaussian(x, v, sigma, sigma_next, sde_type, a=A):
    """Mean and std of the step, from the Flow-GRPO formulas, in float64 (sigma: a float or a [B] tensor)."""
    x, v = x.double(), v.double()
    view = (-1,) + (1,) * (x.dim() - 1)
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(view)
    sn = torch.as_tensor(sigma_next, dtype=torch.float64).reshape(view)
    if sde_type == "sde":
        sigma_in_denominator = torch.where(s == 1, sn, s)  # flow_grpo: sigmas[1] (= σ' at the first step) at σ = 1
        std_dev_t = a * torch.sqrt(s / (1 - sigma_in_denominator))
        dt = sn - s
        mean = x * (1 + std_dev_t**2 / (2 * s) * dt) + v * (1 + std_dev_t**2 * (1 - s) / (2 * s)) * dt
        std = std_dev_t * torch.sqrt(-dt)
    else:
        std = sn * math.sin(a * math.pi / 2)
        x0 = x - s * v
        noise_estimate = x + (1 - s) * v
        mean = x0 * (1 - sn) + noise_estimate * torch.sqrt(sn**2 - std**2)
    return mean, std.expand(x.shape)


def _logp(mean, std, x_next):
    return Normal(mean, std).log_prob(x_next.double()).flatten(1).mean(1)


@pytest.mark.parametrize("sde_type, step", CASES)
def test_mean_std_logprob_match_the_gaussian_transition(sde_type, step):
    sigma, sigma_next = STEPS[step]
    x, v = _inputs()
    mean64, std64 = _gaussian(x, v, sigma, sigma_next, sde_type)
    # A typical landing point and one far in the tails (the quadratic term dominates there).
    g = torch.Generator().manual_seed(1)
    for spread in (1.0, 3.0):
        x_next = (mean64 + spread * std64 * torch.randn(SHAPE, generator=g, dtype=torch.float64)).float()
        out = sde_step(v, x, sigma, sigma_next, noise_level=A, sde_type=sde_type, prev_sample=x_next)
        assert isinstance(out, SDEStep)
        assert out.std.shape == (SHAPE[0],) and out.log_prob.shape == (SHAPE[0],)
        for t in (out.prev_sample, out.log_prob, out.mean, out.std):
            assert t.dtype == torch.float32 and torch.isfinite(t).all()
        torch.testing.assert_close(out.std.double(), std64[:, 0, 0, 0], rtol=1e-6, atol=0)
        scale = mean64.abs().max().item()  # fp32 holds the mean to ~1e-7 of its size (~1e4 near σ = 1)
        torch.testing.assert_close(out.mean.double(), mean64, rtol=1e-6, atol=1e-6 * scale)
        want = _logp(mean64, std64, x_next)
        # Seen: ≤ 1.2e-6 in fp32, also at σ = 1e-4 where std is 7e-5 (x' - μ is formed as (x' - x) - drift).
        torch.testing.assert_close(out.log_prob.double(), want, rtol=1e-6, atol=1e-5)
        # The same step in float64 (the module keeps float64) matches to float64 precision.
        out64 = sde_step(v.double(), x.double(), sigma, sigma_next, noise_level=A, sde_type=sde_type,
                         prev_sample=x_next.double())  # fmt: skip
        torch.testing.assert_close(out64.mean, mean64, rtol=1e-12, atol=1e-12 * scale)
        torch.testing.assert_close(out64.log_prob, want, rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_per_sample_sigmas(sde_type):
    x, v = _inputs()
    sigma, sigma_next = torch.tensor([1.0, 0.6, 0.3]), torch.tensor([0.95, 0.55, 0.2])
    mean64, std64 = _gaussian(x, v, sigma, sigma_next, sde_type)
    out = sde_step(v, x, sigma, sigma_next, noise_level=A, sde_type=sde_type, generator=torch.Generator())
    torch.testing.assert_close(out.mean.double(), mean64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.std.double(), std64[:, 0, 0, 0], rtol=1e-6, atol=0)
    torch.testing.assert_close(out.log_prob.double(), _logp(mean64, std64, out.prev_sample), rtol=1e-6, atol=2e-5)


@pytest.mark.parametrize("sde_type, step", [("sde", "first"), ("sde", "last"), ("cps", "middle"), ("cps", "near1")])
def test_sampled_steps_follow_the_gaussian(sde_type, step):
    sigma, sigma_next = STEPS[step]
    x, v = _inputs(shape=(2, 2, 4, 4))
    mean64, std64 = _gaussian(x, v, sigma, sigma_next, sde_type)
    g = torch.Generator().manual_seed(3)
    draws = []
    for _ in range(200):
        out = sde_step(v, x, sigma, sigma_next, noise_level=A, sde_type=sde_type, generator=g)
        # The log-prob of a sample is the density at that sample.
        torch.testing.assert_close(out.log_prob.double(), _logp(mean64, std64, out.prev_sample), rtol=1e-6, atol=1e-4)
        draws.append(out.prev_sample.double())
    draws = torch.stack(draws)  # [200, B, ...]
    z = (draws - mean64) / std64
    assert abs(z.mean().item()) < 4.5 / math.sqrt(z.numel())
    assert abs(z.std().item() - 1) < 0.03
    # Each element's empirical mean, in its own std: within 4.5 standard errors of 200 draws.
    assert (z.mean(0).abs() < 4.5 / math.sqrt(200)).all()
    # One generator draw per call: the same seed gives the same sample.
    a = sde_step(v, x, sigma, sigma_next, sde_type=sde_type, generator=torch.Generator().manual_seed(7))
    b = sde_step(v, x, sigma, sigma_next, sde_type=sde_type, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.prev_sample, b.prev_sample)


@pytest.mark.parametrize("sde_type, step", [("sde", "first"), ("sde", "middle"), ("sde", "last"), ("cps", "middle")])
def test_bf16_inputs_are_computed_in_fp32(sde_type, step):
    sigma, sigma_next = STEPS[step]
    x, v = _inputs()
    x16, v16 = x.bfloat16(), v.bfloat16()
    x_next = sde_step(v, x, sigma, sigma_next, sde_type=sde_type, generator=torch.Generator().manual_seed(2))
    x_next = x_next.prev_sample
    got = sde_step(v16, x16, sigma, sigma_next, sde_type=sde_type, prev_sample=x_next)
    assert got.mean.dtype == torch.float32 and torch.isfinite(got.log_prob).all()
    # bf16 values upcast first: exactly the fp32 computation on the rounded inputs ...
    upcast = sde_step(v16.float(), x16.float(), sigma, sigma_next, sde_type=sde_type, prev_sample=x_next)
    torch.testing.assert_close(got.log_prob, upcast.log_prob, rtol=0, atol=0)
    # ... and close to the fp32 inputs: bf16 rounds x, v by ≤ 2^-9 relative, which moves μ by a small part of std.
    full = sde_step(v, x, sigma, sigma_next, sde_type=sde_type, prev_sample=x_next)
    torch.testing.assert_close(got.mean, full.mean, rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(got.log_prob, full.log_prob, rtol=0, atol=0.1)
    lp, kl = transition_logprob(v16, x16, x_next, sigma, sigma_next, noise_level=A, sde_type=sde_type,
                                ref_velocity=(v + 0.1).bfloat16())  # fmt: skip
    assert torch.isfinite(lp).all() and torch.isfinite(kl).all()


@pytest.mark.parametrize("sde_type, step", [("sde", "first"), ("sde", "last"), ("cps", "middle"), ("cps", "near1")])
def test_kl_is_the_closed_form_gaussian_kl(sde_type, step):
    sigma, sigma_next = STEPS[step]
    x, v = _inputs()
    v_ref = v + 0.3 * _inputs(seed=5)[1]
    mean, std = _gaussian(x, v, sigma, sigma_next, sde_type)
    mean_ref, _ = _gaussian(x, v_ref, sigma, sigma_next, sde_type)
    want = kl_divergence(Normal(mean, std), Normal(mean_ref, std)).flatten(1).mean(1)
    x_next = sde_step(v, x, sigma, sigma_next, sde_type=sde_type, generator=torch.Generator()).prev_sample
    lp, kl = transition_logprob(v, x, x_next, sigma, sigma_next, noise_level=A, sde_type=sde_type, ref_velocity=v_ref)
    assert kl.shape == (SHAPE[0],)
    torch.testing.assert_close(kl.double(), want, rtol=1e-5, atol=1e-9)
    lp0, kl0 = transition_logprob(v, x, x_next, sigma, sigma_next, noise_level=A, sde_type=sde_type)
    assert kl0 is None and torch.equal(lp0, lp)
    _, same = transition_logprob(v, x, x_next, sigma, sigma_next, noise_level=A, sde_type=sde_type, ref_velocity=v)
    assert (same == 0).all()


def test_sde_step_and_transition_logprob_agree_exactly():
    x, v = _inputs()
    out = sde_step(v, x, 0.6, 0.55, sde_type="cps", generator=torch.Generator().manual_seed(0))
    lp, _ = transition_logprob(v, x, out.prev_sample, 0.6, 0.55, noise_level=A, sde_type="cps")
    assert torch.equal(lp, out.log_prob)  # on-policy ratios are exactly 1


@pytest.mark.parametrize("sde_type, step", [("sde", "first"), ("sde", "last"), ("cps", "middle")])
def test_gradients_wrt_velocity(sde_type, step):
    sigma, sigma_next = STEPS[step]
    x, v = _inputs(shape=(2, 2, 3, 3))
    v_ref = v + 0.2 * _inputs(seed=9, shape=(2, 2, 3, 3))[1]
    mean, std = _gaussian(x, v, sigma, sigma_next, sde_type)
    x_next = mean + std * _inputs(seed=4, shape=(2, 2, 3, 3), dtype=torch.float64)[0]

    def ours(vel):
        return transition_logprob(vel, x.double(), x_next, sigma, sigma_next, noise_level=A, sde_type=sde_type,
                                  ref_velocity=v_ref.double())  # fmt: skip

    assert torch.autograd.gradcheck(ours, (v.double().requires_grad_(True),))
    # fp32 gradients vs autograd through the formulas above (float64), for a random mix of both outputs.
    w_lp, w_kl = torch.tensor([0.7, -1.3]), torch.tensor([2.0, 0.5])
    vel = v.clone().requires_grad_(True)
    lp, kl = transition_logprob(vel, x, x_next.float(), sigma, sigma_next, noise_level=A, sde_type=sde_type,
                                ref_velocity=v_ref.requires_grad_(True))  # fmt: skip
    (got,) = torch.autograd.grad((w_lp * lp + w_kl * kl).sum(), vel)
    assert v_ref.grad is None
    vel64 = v.double().requires_grad_(True)
    m, s = _gaussian(x, vel64, sigma, sigma_next, sde_type)
    m_ref, _ = _gaussian(x, v_ref.detach(), sigma, sigma_next, sde_type)
    lp64 = _logp(m, s, x_next)
    kl64 = ((m - m_ref) ** 2 / (2 * s**2)).flatten(1).mean(1)
    (want,) = torch.autograd.grad((w_lp.double() * lp64 + w_kl.double() * kl64).sum(), vel64)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6 * want.abs().max().item())


def test_cps_at_the_last_step_and_zero_noise_have_no_density():
    x, v = _inputs()
    for kwargs in (dict(sde_type="cps", noise_level=A), dict(sde_type="sde", noise_level=0.0)):
        sigma_next = 0.0 if kwargs["sde_type"] == "cps" else 0.5
        with pytest.raises(ValueError, match="std 0") as err:
            sde_step(v, x, 0.6, sigma_next, generator=torch.Generator(), **kwargs)
        assert "\n" not in str(err.value)
        with pytest.raises(ValueError, match="no log-density"):
            transition_logprob(v, x, x, 0.6, sigma_next, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sde_type="ode"), "sde_type must be one of .*'ode'"),
        (dict(noise_level=-0.1), "noise_level .*-0.1"),
        (dict(noise_level=float("nan")), "noise_level .*nan"),
        (dict(sigma=0.5, sigma_next=0.5), "sigma_next < sigma"),
        (dict(sigma=1.2, sigma_next=0.5), "sigma=1.2"),
        (dict(sigma=torch.tensor([0.5, 0.4]), sigma_next=0.1), r"\[B\] = \[3\]"),
    ],
)
def test_bad_settings_raise_one_line(kwargs, match):
    x, v = _inputs()
    args = dict(sigma=0.6, sigma_next=0.5, sde_type="sde", noise_level=A) | kwargs
    for call in (
        lambda: sde_step(v, x, args["sigma"], args["sigma_next"], noise_level=args["noise_level"],
                         sde_type=args["sde_type"]),
        lambda: transition_logprob(v, x, x, args["sigma"], args["sigma_next"], noise_level=args["noise_level"],
                                   sde_type=args["sde_type"]),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=match) as err:
            call()
        assert "\n" not in str(err.value)


def test_loss_matches_hand_written_ppo_maths():
    eps, beta = 0.2, 0.04
    # ratio e^0.3 > 1+ε with A > 0 and e^-0.4 < 1-ε with A < 0: the clipped branch wins, no gradient. e^0.5 with
    # A < 0 and e^-0.5 with A > 0 lie outside the range but the unclipped branch wins; e^0.05 inside; A = 0.
    log_prob = torch.tensor([0.3, -0.4, 0.5, -0.5, 0.05, 0.1], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.2], dtype=torch.float64)
    adv = torch.tensor([1.5, -2.0, -1.0, 0.8, 0.6, 0.0], dtype=torch.float64)
    kl = torch.tensor([0.1, 0.0, 0.3, 0.2, 0.05, 0.4], dtype=torch.float64, requires_grad=True)
    loss, metrics = flow_grpo_loss(log_prob, old, adv, clip_range=eps, beta=beta, kl=kl)
    n = 6
    terms, grad_lp, outside = [], [], 0
    for lp_i, old_i, a_i in zip(log_prob.tolist(), old.tolist(), adv.tolist()):
        r = math.exp(lp_i - old_i)
        r_clipped = min(max(r, 1 - eps), 1 + eps)
        terms.append(max(-a_i * r, -a_i * r_clipped))
        clipped_wins = -a_i * r_clipped > -a_i * r
        grad_lp.append(0.0 if clipped_wins else -a_i * r / n)
        outside += abs(r - 1) > eps
    assert grad_lp[0] == 0.0 and grad_lp[1] == 0.0 and grad_lp[2] != 0.0 and grad_lp[3] != 0.0
    want = sum(terms) / n + beta * sum(kl.tolist()) / n
    assert loss.item() == pytest.approx(want, rel=1e-12)
    g_lp, g_kl = torch.autograd.grad(loss, [log_prob, kl])
    torch.testing.assert_close(g_lp, torch.tensor(grad_lp, dtype=torch.float64))
    torch.testing.assert_close(g_kl, torch.full((n,), beta / n, dtype=torch.float64))
    diffs = (log_prob - old).tolist()
    assert metrics["clip_ratio"].item() == pytest.approx(outside / n) and outside == 4
    assert metrics["approx_kl"].item() == pytest.approx(0.5 * sum(d * d for d in diffs) / n)
    assert metrics["ratio"].item() == pytest.approx(sum(math.exp(d) for d in diffs) / n)
    assert metrics["kl"].item() == pytest.approx(sum(kl.tolist()) / n)
    assert all(not m.requires_grad for m in metrics.values())


def test_loss_without_kl_and_its_errors():
    lp = torch.tensor([0.1, -0.1], requires_grad=True)
    loss, metrics = flow_grpo_loss(lp, torch.zeros(2), torch.tensor([1.0, -1.0]), clip_range=0.5)
    assert loss.item() == pytest.approx(-(math.exp(0.1) - math.exp(-0.1)) / 2, rel=1e-6)
    assert "kl" not in metrics and metrics["clip_ratio"].item() == 0.0
    with pytest.raises(ValueError, match="beta > 0 needs kl"):
        flow_grpo_loss(lp, torch.zeros(2), torch.ones(2), clip_range=0.2, beta=0.1)
    with pytest.raises(ValueError, match="advantages must be"):
        flow_grpo_loss(lp, torch.zeros(2), torch.ones(3), clip_range=0.2)
    with pytest.raises(ValueError, match="clip_range"):
        flow_grpo_loss(lp, torch.zeros(2), torch.ones(2), clip_range=-0.2)
