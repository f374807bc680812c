"""The fused GRPO loss against the full-logits reference, TRL's own GRPOTrainer loss code, and Liger-Kernel."""

from __future__ import annotations

import itertools
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from uae_fast.kernels.grpo_loss import fused_linear_grpo_loss, grpo_loss_ref

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
MAX_LEN = 9


def _batch(seed=0, s=5, t=MAX_LEN, h=16, v=503, temperature=0.9, fully_masked_row=True):
    """Padded [S, T] completions (ragged lengths, one fully masked sequence) with old/ref log-probs near the
    current policy, so that some ratios clip on each side."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(s, t, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.3
    ids = torch.randint(0, v, (s, t), generator=g)
    lengths = torch.randint(1, t + 1, (s,), generator=g)
    if fully_masked_row:
        lengths[1] = 0
    mask = (torch.arange(t)[None] < lengths[:, None]).float()
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.t() / temperature, -1).gather(2, ids[..., None]).squeeze(-1)
    old = logp + 0.3 * torch.randn(s, t, generator=g)
    ref = logp + 0.5 * torch.randn(s, t, generator=g)
    adv = torch.randn(s, generator=g)
    return SimpleNamespace(hidden=hidden, weight=weight, ids=ids, mask=mask, old=old, ref=ref, adv=adv, T=temperature)


def _packed(b):
    keep = b.mask.bool()
    seq_index = torch.arange(b.ids.shape[0])[:, None].expand_as(b.ids)[keep]
    return b.hidden[keep], b.ids[keep], seq_index, b.old[keep], b.ref[keep]


CASES = list(itertools.product(LOSS_TYPES, ["token", "sequence"], [False, True], [False, True], [0.0, 0.04]))


@pytest.mark.parametrize("loss_type, level, off_policy, train_head, beta", CASES)
def test_matches_full_logits_reference(loss_type, level, off_policy, train_head, beta):
    b = _batch()
    h, y, si, old, ref = _packed(b)
    kw = dict(
        num_sequences=5, beta=beta, loss_type=loss_type, importance_sampling_level=level, temperature=b.T,
        max_completion_length=MAX_LEN, epsilon_low=0.2, epsilon_high=0.28, old_logp=old if off_policy else None,
        ref_logp=ref if beta else None,
    )  # fmt: skip
    outs = []
    for fn, extra in ((fused_linear_grpo_loss, {"chunk_size": 4}), (grpo_loss_ref, {})):
        hh, ww = h.clone().requires_grad_(True), b.weight.clone().requires_grad_(train_head)
        loss = fn(hh, ww, y, si, b.adv, **kw, **extra)[0]
        outs.append([loss, *torch.autograd.grad(loss, [hh, ww] if train_head else [hh])])
    for ours, ref_ in zip(*outs):
        torch.testing.assert_close(ours, ref_, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- TRL's GRPOTrainer._compute_loss as the oracle
class _TRLStub:
    """The attributes GRPOTrainer._compute_loss reads, with per-token log-probs from full logits (TRL's helpers)."""

    def __init__(self, b, loss_type, level, beta):
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax

        self.beta, self.loss_type, self.importance_sampling_level = beta, loss_type, level
        self.epsilon_low, self.epsilon_high = 0.2, 0.28
        self.top_entropy_quantile, self.off_policy_mask_threshold = 1.0, None
        self.use_vllm, self.aux_loss_enabled, self._entropy_bonus_enabled = False, False, False
        self.current_gradient_accumulation_steps, self.max_completion_length = 1, MAX_LEN
        self.args = SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
        self.model = SimpleNamespace(training=True)
        ident = lambda x, **kw: x  # noqa: E731
        self.accelerator = SimpleNamespace(num_processes=1, gather=ident, reduce=ident, gather_for_metrics=ident)
        self._metrics = defaultdict(lambda: defaultdict(list))
        self._b, self._sls, self._ent = b, selective_log_softmax, entropy_from_logits

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kw):
        logits = self._b.hidden_param @ self._b.weight.t() / self._b.T
        return self._sls(logits, self._b.ids), self._ent(logits).detach(), None


@pytest.mark.parametrize("loss_type, level", list(itertools.product(LOSS_TYPES, ["token", "sequence"])))
@pytest.mark.parametrize("off_policy", [False, True])
def test_matches_trl_grpo_trainer_loss(loss_type, level, off_policy):
    from trl import GRPOTrainer

    b = _batch(seed=1)
    beta = 0.04
    b.hidden_param = b.hidden.clone().requires_grad_(True)
    stub = _TRLStub(b, loss_type, level, beta)
    inputs = {
        "prompt_ids": torch.zeros(5, 1, dtype=torch.long),
        "prompt_mask": torch.ones(5, 1),
        "completion_ids": b.ids,
        "completion_mask": b.mask,
        "advantages": b.adv,
        "ref_per_token_logps": b.ref,
        "num_items_in_batch": b.mask.sum(),
    }
    if off_policy:
        inputs["old_per_token_logps"] = b.old
    trl_loss = GRPOTrainer._compute_loss(stub, None, inputs)
    (trl_grad,) = torch.autograd.grad(trl_loss, b.hidden_param)

    h, y, si, old, ref = _packed(b)
    h.requires_grad_(True)
    loss, _, metrics = fused_linear_grpo_loss(
        h, b.weight, y, si, b.adv, num_sequences=5, beta=beta, loss_type=loss_type, importance_sampling_level=level,
        temperature=b.T, max_completion_length=MAX_LEN, epsilon_low=0.2, epsilon_high=0.28,
        old_logp=old if off_policy else None, ref_logp=ref, chunk_size=3,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, h)
    torch.testing.assert_close(loss, trl_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, trl_grad[b.mask.bool()], atol=1e-6, rtol=1e-5)
    logged = stub._metrics["train"]
    for name in ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert metrics[name].item() == pytest.approx(logged[name][-1], abs=1e-5), name
    if off_policy and level == "token":
        assert logged["clip_ratio/region_mean"][-1] > 0  # the test exercises clipping


# ---------------------------------------------------------------- Liger-Kernel as a second peer
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_matches_liger_fused_linear_grpo(loss_type, level):
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    b = _batch(seed=2)
    beta = 0.04
    module = liger.LigerFusedLinearGRPOLoss(
        beta=beta, compiled=False, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, temperature=b.T,
        max_completion_length=MAX_LEN, importance_sampling_level=level, chunk_size=2,
    )  # fmt: skip
    hl = b.hidden.clone().requires_grad_(True)
    wl = b.weight.clone().requires_grad_(True)
    out = module(hl, wl, b.ids, b.mask, b.adv, ref_per_token_logps=b.ref, old_per_token_logps=b.old)
    liger_loss = out[0] if isinstance(out, tuple) else out
    liger_grads = torch.autograd.grad(liger_loss, [hl, wl])

    h, y, si, old, ref = _packed(b)
    h.requires_grad_(True)
    w = b.weight.clone().requires_grad_(True)
    loss, _, _ = fused_linear_grpo_loss(
        h, w, y, si, b.adv, num_sequences=5, beta=beta, loss_type=loss_type, importance_sampling_level=level,
        temperature=b.T, max_completion_length=MAX_LEN, epsilon_low=0.2, epsilon_high=0.28, old_logp=old,
        ref_logp=ref, chunk_size=4,
    )  # fmt: skip
    grads = torch.autograd.grad(loss, [h, w])
    torch.testing.assert_close(loss, liger_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[0], liger_grads[0][b.mask.bool()], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[1], liger_grads[1], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- odd shapes and inputs
def test_single_token_group_of_one_and_fully_masked_sequence():
    b = _batch(seed=3, s=1, t=1, fully_masked_row=False)
    h, y, si, _, _ = _packed(b)
    h.requires_grad_(True)
    loss, logp, metrics = fused_linear_grpo_loss(h, b.weight, y, si, torch.zeros(1), num_sequences=1)
    assert loss.item() == 0.0 and torch.isfinite(logp).all()
    loss.backward()
    assert torch.equal(h.grad, torch.zeros_like(h.grad))  # zero advantage: no signal, no NaN
    # every token masked: zero loss, zero gradient, no NaN
    h2 = torch.randn(4, 16, requires_grad=True)
    loss, _, metrics = fused_linear_grpo_loss(
        h2, b.weight, torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 1, 1]), torch.ones(2),
        mask=torch.zeros(4), loss_type="grpo",
    )  # fmt: skip
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(h2.grad, torch.zeros_like(h2))
    assert all(torch.isfinite(v) for v in metrics.values())


def test_vocab_blocks_and_bf16_head():
    b = _batch(seed=4, v=1000)
    h, y, si, old, ref = _packed(b)
    kw = dict(num_sequences=5, beta=0.04, old_logp=old, ref_logp=ref, temperature=b.T, loss_type="bnpo")
    exact = grpo_loss_ref(h, b.weight, y, si, b.adv, **kw)[0]
    blocked = fused_linear_grpo_loss(h, b.weight, y, si, b.adv, vocab_block=97, chunk_size=5, **kw)[0]
    torch.testing.assert_close(blocked, exact, atol=1e-6, rtol=1e-5)
    low = fused_linear_grpo_loss(h.bfloat16(), b.weight.bfloat16(), y, si, b.adv, chunk_size=5, **kw)[0]
    same_dtype = grpo_loss_ref(h.bfloat16().float(), b.weight.bfloat16().float(), y, si, b.adv, **kw)[0]
    assert (low - exact).abs() <= 2 * (same_dtype - exact).abs() + 1e-3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss_type="ppo"), "loss_type"),
        (dict(importance_sampling_level="seq"), "importance_sampling_level"),
        (dict(beta=0.1), "ref_logp"),
        (dict(loss_type="dr_grpo"), "max_completion_length"),
        (dict(num_sequences=1), "advantages"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    b = _batch(seed=5)
    h, y, si, _, _ = _packed(b)
    with pytest.raises(ValueError, match=message):
        fused_linear_grpo_loss(h, b.weight, y, si, b.adv, **kwargs)


# ---------------------------------------------------------------- trainable head: single pass details
@pytest.mark.parametrize("vocab_block", [None, 97])
def test_trainable_head_repeated_targets_entropy_and_logp(vocab_block):
    """Repeated target ids (the one-hot part of the head gradient is a scatter-add), a partial last chunk, and the
    entropy / log-probs the single pass reports, against full logits."""
    b = _batch(seed=5, v=300)
    h, y, si, old, ref = _packed(b)
    y = y % 7  # many tokens share a target
    kw = dict(num_sequences=5, beta=0.04, old_logp=old, ref_logp=ref, temperature=b.T, loss_type="grpo")
    outs = []
    for fn, extra in ((fused_linear_grpo_loss, {"chunk_size": 6, "vocab_block": vocab_block}), (grpo_loss_ref, {})):
        hh, ww = h.clone().requires_grad_(True), b.weight.clone().requires_grad_(True)
        loss, logp = fn(hh, ww, y, si, b.adv, **kw, **extra)[:2]
        outs.append([loss, logp, *torch.autograd.grad(loss, [hh, ww])])
    for ours, ref_ in zip(*outs):
        torch.testing.assert_close(ours, ref_, atol=1e-6, rtol=1e-5)
    ww = b.weight.clone().requires_grad_(True)
    metrics = fused_linear_grpo_loss(h, ww, y, si, b.adv, chunk_size=6, vocab_block=vocab_block, **kw)[2]
    logsm = torch.log_softmax(h.double() @ b.weight.double().t() / b.T, -1)
    entropy = -(logsm.exp() * logsm).sum(-1).mean().float()
    torch.testing.assert_close(metrics["entropy"], entropy, atol=1e-5, rtol=1e-5)


def test_trainable_bf16_head_gradients_within_bf16_error():
    b = _batch(seed=6, v=400)
    h, y, si, old, ref = _packed(b)
    kw = dict(num_sequences=5, beta=0.04, old_logp=old, ref_logp=ref, temperature=b.T, loss_type="dapo")
    grads = {}
    for name, dtype, fn in (("exact", torch.float32, grpo_loss_ref), ("ours", torch.bfloat16, fused_linear_grpo_loss),
                            ("same_dtype", torch.bfloat16, grpo_loss_ref)):  # fmt: skip
        hh = h.to(dtype).requires_grad_(True)
        ww = b.weight.to(dtype).requires_grad_(True)
        if name == "same_dtype":  # the reference on bf16-rounded inputs, in fp32
            hh, ww = hh.detach().float().requires_grad_(True), ww.detach().float().requires_grad_(True)
        loss = fn(hh, ww, y, si, b.adv, **kw)[0]
        gh, gw = torch.autograd.grad(loss, [hh, ww])
        assert gh.dtype == dtype or name == "same_dtype"
        grads[name] = (gh.float(), gw.float())
    for i in range(2):
        err = (grads["ours"][i] - grads["exact"][i]).abs().max()
        ref_err = (grads["same_dtype"][i] - grads["exact"][i]).abs().max()
        assert err <= 2 * ref_err + 1e-3


@pytest.mark.parametrize("p_target", [0.99, 0.999])
def test_trainable_bf16_head_on_confident_tokens_within_twice_the_plain_bf16_error(p_target):
    """Single pass, bf16 head, tokens whose target holds p_target of the mass: d/dh, d/dW and the entropy metric
    each within 2x the plain bf16 path's error (bf16 GEMM -> fp32 log-softmax -> autograd) against fp64."""
    n, v = 8, 301
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(v, 64, generator=g, dtype=torch.float64) * 0.05).bfloat16().double()
    y = torch.randint(0, v, (n,), generator=g)
    base = torch.randn(n, 64, generator=g, dtype=torch.float64) * 0.5
    direction = w[y] / w[y].norm(dim=1, keepdim=True)
    lo, hi = torch.zeros(n, dtype=torch.float64), torch.full((n,), 300.0, dtype=torch.float64)
    for _ in range(30):  # bisection: how far each hidden state points along its target's row
        c = (lo + hi) / 2
        p = torch.softmax((base + c[:, None] * direction) @ w.t(), -1).gather(1, y[:, None]).squeeze(1)
        lo, hi = torch.where(p < p_target, c, lo), torch.where(p < p_target, hi, c)
    hidden, weight = (base + hi[:, None] * direction).bfloat16(), w.bfloat16()
    # one token per sequence, on-policy, dr_grpo with max length 1: d loss / d logp_t = -A_t / n = d_t
    d = torch.randn(n, generator=g)
    results = []
    for dtype in (torch.float64, torch.bfloat16):  # fp64 oracle, plain bf16 path
        hd, wd = hidden.to(dtype).requires_grad_(True), weight.to(dtype).requires_grad_(True)
        logsm = torch.log_softmax((hd @ wd.t()).to(torch.promote_types(dtype, torch.float32)), -1)
        lp = logsm.gather(1, y[:, None]).squeeze(1)
        assert dtype != torch.float64 or lp.exp().min() >= p_target - 1e-3
        results.append([-(logsm.exp() * logsm).sum(-1).detach(), *torch.autograd.grad((lp * d).sum(), [hd, wd])])
    (exact_ent, *exact), (plain_ent, *plain) = results
    hd, wd = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, _, metrics = fused_linear_grpo_loss(
        hd, wd, y, torch.arange(n), -d * n, loss_type="dr_grpo", max_completion_length=1, chunk_size=6
    )
    ours = torch.autograd.grad(loss, [hd, wd])

    def rel(x, e):
        return ((x.double() - e).norm() / e.norm()).item()

    for name, o, p, e in zip(("grad_hidden", "grad_weight"), ours, plain, exact):
        assert rel(o, e) <= 2 * rel(p, e), (name, rel(o, e), rel(p, e))
    ent_err = (metrics["entropy"].double() - exact_ent.mean()).abs()
    plain_err = (plain_ent.double() - exact_ent).abs().mean()
    assert metrics["entropy"] > 0 and ent_err <= 2 * plain_err, (ent_err, plain_err)


@pytest.mark.parametrize("bad", [503, -1])
@pytest.mark.parametrize("train_head", [False, True])
def test_out_of_range_token_id_is_named(bad, train_head):
    """An id outside [0, V) must not silently give logp = -lse; masked tokens are never looked up, so any id is
    fine there (e.g. -100 padding)."""
    from uae_fast.errors import ConfigError

    b = _batch(seed=5)
    h, y, si, _, _ = _packed(b)
    w = b.weight.clone().requires_grad_(train_head)
    y = y.clone()
    y[3] = bad
    with pytest.raises(ConfigError, match=f"^token id {bad} at position 3 .*vocabulary of 503 entries"):
        fused_linear_grpo_loss(h, w, y, si, b.adv)
    mask = torch.ones(y.shape[0])
    mask[3] = 0
    y2 = y.clone()
    y2[3] = 0
    loss = fused_linear_grpo_loss(h, w, y, si, b.adv, mask=mask)[0]
    torch.testing.assert_close(loss, fused_linear_grpo_loss(h, w, y2, si, b.adv, mask=mask)[0])


# ---------------------------------------------------------------- the entropy bonus
def test_entropy_bonus_is_the_entropy_gradient_in_expectation():
    """Averaged over every token y the policy could sample (weights p(y), enumerated), the bonus's gradient w.r.t.
    the logits is -c ∇H, with H = -Σ p log p differentiated exactly (fp64, autograd); the advantage part is left
    unchanged (zero advantage here: the bonus alone)."""
    from uae_fast.kernels.grpo_loss import per_token_loss

    torch.manual_seed(0)
    vocab, c = 7, 0.05
    z = (torch.randn(vocab, dtype=torch.float64) * 2).requires_grad_(True)
    logp_all = torch.log_softmax(z, -1)
    exact_h = -(logp_all.exp() * logp_all).sum()
    (expected,) = torch.autograd.grad(-c * exact_h, z, retain_graph=True)
    y = torch.arange(vocab)
    logp = logp_all[y]  # one "token" per possible outcome
    ones = torch.ones(vocab, dtype=torch.float64)
    loss_t, _, _ = per_token_loss(
        logp, None, None, torch.zeros(vocab, dtype=torch.float64), ones, y, ones, beta=0.0, epsilon_low=0.2,
        epsilon_high=0.2, importance_sampling_level="token", entropy_coef=c, entropy=exact_h.detach().expand(vocab),
    )  # fmt: skip
    (got,) = torch.autograd.grad((logp_all.exp().detach() * loss_t).sum(), z)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("train_head, vocab_block", [(False, None), (False, 97), (True, None)])
def test_entropy_bonus_in_every_path(train_head, vocab_block):
    """Fused (frozen head, vocabulary blocks, the trainable head's single pass) = the full-logits loss plus the
    bonus written out here (dapo: w_t = 1/N), H_t from the full softmax; and the bonus changes the gradient."""
    b = _batch(seed=6, v=300)
    h, y, si, _, _ = _packed(b)
    c = 0.1
    kw = dict(num_sequences=5, temperature=b.T, loss_type="dapo")
    hh, ww = h.clone().requires_grad_(True), b.weight.clone().requires_grad_(train_head)
    ours = fused_linear_grpo_loss(hh, ww, y, si, b.adv, entropy_coef=c, chunk_size=4, vocab_block=vocab_block, **kw)[0]
    got = torch.autograd.grad(ours, [hh, ww] if train_head else [hh])

    hr, wr = h.clone().requires_grad_(True), b.weight.clone().requires_grad_(train_head)
    plain = grpo_loss_ref(hr, wr, y, si, b.adv, **kw)[0]
    logsm = torch.log_softmax(hr @ wr.t() / b.T, -1)
    logp = logsm.gather(1, y[:, None]).squeeze(1)
    entropy = -(logsm.exp() * logsm).sum(-1).detach()
    # on-policy, ratio = exp(log p − log p.detach()): each token's term −(A − c(log p + H))·ratio adds
    # c(log p + H) to the value and c(log p + H)·∇log p to the gradient
    shift = c * (logp.detach() + entropy)
    without = torch.autograd.grad(plain, hr, retain_graph=True)[0]
    expected = torch.autograd.grad(plain + (shift * logp).sum() / len(y), [hr, wr] if train_head else [hr])
    torch.testing.assert_close(ours, plain + shift.sum() / len(y), atol=1e-6, rtol=1e-5)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got[0], without, atol=1e-4)


def test_negative_entropy_coef_is_named():
    b = _batch(seed=5)
    h, y, si, _, _ = _packed(b)
    with pytest.raises(ValueError, match="entropy_coef"):
        fused_linear_grpo_loss(h, b.weight, y, si, b.adv, entropy_coef=-0.1)
