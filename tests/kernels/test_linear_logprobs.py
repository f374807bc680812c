"""Chunked linear log-probs against the fp32 full-logits reference (values, entropy, both gradients)."""

from __future__ import annotations

import pytest
import torch

from uae_fast.kernels import linear_logprobs as mod
from uae_fast.kernels.linear_logprobs import linear_logprobs, linear_logprobs_ref

QWEN_VOCAB = 151_936


def _inputs(n, h, v, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, h, generator=g),
        torch.randn(v, h, generator=g) * scale,
        torch.randint(0, v, (n,), generator=g),
    )


@pytest.mark.parametrize(
    "n, h, v, chunk, block",
    [
        (1, 8, 7, 4, None),  # a single token
        (37, 24, 1001, 10, None),  # N not a multiple of the chunk, V odd
        (37, 24, 1001, 10, 128),  # vocabulary in blocks, last block partial
        (16, 16, 300, 16, 1),  # degenerate one-entry blocks
        (5, 32, QWEN_VOCAB, 3, None),  # the real vocabulary
        (5, 32, QWEN_VOCAB, 4, 32768),
    ],
)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference_values_entropy_and_gradients(n, h, v, chunk, block, temperature):
    """Error against an fp64 oracle within twice the fp32 reference's own error (+ a small atol)."""
    hidden, weight, y = _inputs(n, h, v)
    g = torch.randn(n, generator=torch.Generator().manual_seed(1))

    def run(fn, dtype, **kw):
        hd, wd = hidden.to(dtype).requires_grad_(True), weight.to(dtype).requires_grad_(True)
        lp, ent = fn(hd, wd, y, temperature=temperature, entropy=True, **kw)
        grads = torch.autograd.grad((lp * g.to(lp.dtype)).sum(), [hd, wd])
        return [lp.double(), ent.double(), *(x.double() for x in grads)]

    exact = run(linear_logprobs_ref, torch.float64)
    fp32_ref = run(linear_logprobs_ref, torch.float32)
    ours = run(linear_logprobs, torch.float32, chunk_size=chunk, vocab_block=block)
    for name, o, r, e in zip(("logp", "entropy", "grad_hidden", "grad_weight"), ours, fp32_ref, exact):
        err, ref_err = (o - e).abs().max().item(), (r - e).abs().max().item()
        # The entropy is a logged metric; with gradients on it is lse - hs·E_p[W], which reuses the gradient's GEMM
        # instead of another pass over the logits, at ~5e-5 relative error (see linear_logprobs).
        slack = 1e-4 * e.abs().max().item() if name == "entropy" else 0.0
        assert err <= 2 * ref_err + 1e-5 + slack, (name, err, ref_err)


def test_frozen_head_gets_no_gradient_and_no_recompute(monkeypatch):
    hidden, weight, y = _inputs(9, 8, 50)
    hidden.requires_grad_(True)
    calls = []
    monkeypatch.setattr(mod, "_weight_grad", lambda *a: calls.append(1))
    lp, _ = linear_logprobs(hidden, weight, y, chunk_size=4)
    lp.sum().backward()
    assert hidden.grad is not None and weight.grad is None and not calls


def test_no_grad_pass_skips_the_expectation_gemm(monkeypatch):
    hidden, weight, y = _inputs(9, 8, 50)
    hidden.requires_grad_(True)
    seen = []
    real = mod._chunk_forward
    monkeypatch.setattr(mod, "_chunk_forward", lambda *a: seen.append(a[7] is not None) or real(*a))  # pw_t
    with torch.no_grad():
        lp, _ = linear_logprobs(hidden, weight, y, chunk_size=4)
    assert seen and not any(seen)
    torch.testing.assert_close(lp, linear_logprobs_ref(hidden, weight, y)[0], atol=2e-5, rtol=0)


def test_bf16_error_is_within_twice_the_bf16_reference_error():
    hidden, weight, y = _inputs(64, 64, 5003, scale=0.3)
    exact, _ = linear_logprobs_ref(hidden, weight, y)
    ours, _ = linear_logprobs(hidden.bfloat16(), weight.bfloat16(), y, chunk_size=16)
    logits = (hidden.bfloat16() @ weight.bfloat16().t()).float()  # the same-dtype reference: bf16 GEMM, fp32 softmax
    same_dtype = torch.log_softmax(logits, -1).gather(1, y[:, None]).squeeze(1)
    err, ref_err = (ours - exact).abs().max(), (same_dtype - exact).abs().max()
    assert err <= 2 * ref_err + 1e-4, (err, ref_err)


def test_extreme_logits_stay_finite():
    hidden, weight, y = _inputs(6, 4, 97)
    lp, ent = linear_logprobs(hidden * 300, weight, y, chunk_size=4, vocab_block=10, entropy=True)
    lr, er = linear_logprobs_ref(hidden * 300, weight, y, entropy=True)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    torch.testing.assert_close(lp, lr, atol=1e-3, rtol=1e-5)


def test_empty_input_and_bad_arguments():
    hidden, weight, y = _inputs(0, 4, 10)
    lp, _ = linear_logprobs(hidden, weight, y)
    assert lp.shape == (0,)
    h, w, y = _inputs(3, 4, 10)
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs(h, w, y, temperature=0)
    with pytest.raises(ValueError, match="weight"):
        linear_logprobs(h, w[:, :3], y)
    with pytest.raises(ValueError, match="targets"):
        linear_logprobs(h, w, y[:2])


@pytest.mark.triton
@pytest.mark.parametrize("block", [None, 48])
def test_triton_kernel_matches_reference(monkeypatch, block):
    pytest.importorskip("triton")
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest must set TRITON_INTERPRET before kernels import"
    monkeypatch.setattr(mod, "FORCE_TRITON", True)
    hidden, weight, y = _inputs(7, 16, 301)
    hidden.requires_grad_(True)
    lp, ent = linear_logprobs(hidden, weight, y, temperature=0.8, chunk_size=4, vocab_block=block, entropy=True)
    lr, er = linear_logprobs_ref(hidden, weight, y, temperature=0.8, entropy=True)
    torch.testing.assert_close(lp, lr, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent, er, atol=2e-5, rtol=1e-5)
    g = torch.randn(7)
    torch.testing.assert_close(
        torch.autograd.grad((lp * g).sum(), hidden)[0],
        torch.autograd.grad((lr * g).sum(), hidden)[0],
        atol=2e-5,
        rtol=1e-4,
    )


@pytest.mark.triton
def test_triton_block_update_equals_torch_update():
    """The kernel and its torch twin fold the same blocks into the same state."""
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(3)
    c, n = 5, 70
    y = torch.tensor([3, 69, 100, 0, 140])
    states = []
    for impl in (mod._online_block_triton, mod._online_block_torch):
        state = tuple(torch.zeros(c) for _ in range(4))
        outs = []
        for start, first in ((0, True), (70, False)):
            z = torch.randn(c, n, generator=torch.Generator().manual_seed(start)) * 3
            alpha = impl(z, y, state, start, first, True)
            outs += [z, alpha]
        states.append([*state, *outs])
    for a, b in zip(*states):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    del g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_logits_layout_and_values(monkeypatch, dtype):
    """CPU: logits stored transposed (the fast MKL layout) but equal to hs wᵀ; the Triton path gets rows."""
    hs, w, _ = _inputs(6, 16, 50)
    buf = torch.full((6 * 50 + 7,), float("nan"))
    z = mod.block_logits(hs, w.to(dtype), buf)
    assert z.shape == (6, 50) and z.dtype == torch.float32 and z.stride() == (1, 6)
    # same GEMM up to summation order (fp32), or the bf16 GEMM's rounding
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(z, (hs.to(dtype) @ w.to(dtype).t()).float(), atol=tol, rtol=tol)
    monkeypatch.setattr(mod, "_use_triton", lambda x: True)
    z = mod.block_logits(hs, w, buf)
    assert z.stride() == (50, 1)
    torch.testing.assert_close(z, hs @ w.t())


def test_first_head_grad_block_overwrites_garbage():
    """`first=True` must ignore whatever the (torch.empty) gradient buffer held, NaN included."""
    hs, w, y = _inputs(5, 8, 30)
    e, g = torch.rand(5, 30), torch.randn(5)
    clean = torch.zeros(30, 8)
    mod.accumulate_head_grad(clean, e, g * 0.5, g, hs, y, 0)
    dirty = torch.full((30, 8), float("nan"))
    mod.accumulate_head_grad(dirty, e, g * 0.5, g, hs, y, 0, first=True)
    torch.testing.assert_close(dirty, clean)
    expected = (g[:, None] * (torch.nn.functional.one_hot(y, 30) - 0.5 * e)).t() @ hs
    torch.testing.assert_close(clean, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- bf16 on confident tokens (p_y >= 0.99)
def _confident_bf16(n, h, v, p_target, seed=0):
    """bf16 hidden [n, h] / head [v, h] / targets [n] whose target holds p_target of the mass (fp64 bisection on
    how far each hidden state points along its target's row)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(v, h, generator=g, dtype=torch.float64) * 0.05).bfloat16().double()
    y = torch.randint(0, v, (n,), generator=g)
    base = torch.randn(n, h, generator=g, dtype=torch.float64) * 0.5
    direction = w[y] / w[y].norm(dim=1, keepdim=True)
    lo, hi = torch.zeros(n, dtype=torch.float64), torch.full((n,), 300.0, dtype=torch.float64)
    for _ in range(30):
        c = (lo + hi) / 2
        p = torch.softmax((base + c[:, None] * direction) @ w.t(), -1).gather(1, y[:, None]).squeeze(1)
        lo, hi = torch.where(p < p_target, c, lo), torch.where(p < p_target, hi, c)
    return (base + hi[:, None] * direction).bfloat16(), w.bfloat16(), y


def _exact_and_plain_bf16(hidden, weight, y, g):
    """fp64 oracle and the plain bf16 path (bf16 GEMM -> fp32 log-softmax -> autograd): (logp, entropy, d/dh,
    d/dW) each, on the same bf16 inputs."""
    out = []
    for dtype in (torch.float64, torch.bfloat16):
        hd, wd = hidden.to(dtype).requires_grad_(True), weight.to(dtype).requires_grad_(True)
        logsm = torch.log_softmax((hd @ wd.t()).to(torch.promote_types(dtype, torch.float32)), -1)
        lp = logsm.gather(1, y[:, None]).squeeze(1)
        ent = -(logsm.exp() * logsm).sum(-1)
        out.append([lp.detach(), ent.detach(), *torch.autograd.grad((lp * g.to(lp.dtype)).sum(), [hd, wd])])
    return out


def _rel(x, exact):
    return ((x.double() - exact.double()).norm() / exact.double().norm()).item()


@pytest.mark.parametrize("p_target", [0.99, 0.999])
@pytest.mark.parametrize("block", [None, 128])
def test_bf16_confident_tokens_within_twice_the_plain_bf16_error(p_target, block):
    """d/dh (frozen head), d/dW (trainable head) and the entropy: the target's gradient term (1 - p_y) W[y] must not
    be taken as W[y] - E_p[W] after a bf16 GEMM (error ~ 1 / (1 - p_y)), nor the entropy as lse - E_p[z]."""
    hidden, weight, y = _confident_bf16(8, 64, 301, p_target)
    g = torch.randn(8, generator=torch.Generator().manual_seed(1))
    exact, plain = _exact_and_plain_bf16(hidden, weight, y, g)
    assert exact[0].exp().min() >= p_target - 1e-3

    hd = hidden.clone().requires_grad_(True)
    lp, ent = linear_logprobs(hd, weight, y, chunk_size=6, vocab_block=block, entropy=True)
    (grad_h,) = torch.autograd.grad((lp * g).sum(), hd)
    assert _rel(grad_h, exact[2]) <= 2 * _rel(plain[2], exact[2]), (_rel(grad_h, exact[2]), _rel(plain[2], exact[2]))
    ent_err, plain_ent_err = (ent.double() - exact[1]).abs().max(), (plain[1].double() - exact[1]).abs().max()
    assert ent.min() >= 0 and ent_err <= 2 * plain_ent_err + 1e-6, (ent_err, plain_ent_err)

    hd, wd = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lp, _ = linear_logprobs(hd, wd, y, chunk_size=6, vocab_block=block)
    grad_h, grad_w = torch.autograd.grad((lp * g).sum(), [hd, wd])
    assert _rel(grad_h, exact[2]) <= 2 * _rel(plain[2], exact[2])
    assert _rel(grad_w, exact[3]) <= 2 * _rel(plain[3], exact[3]), (_rel(grad_w, exact[3]), _rel(plain[3], exact[3]))


@pytest.mark.triton
def test_triton_bf16_confident_tokens(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(mod, "FORCE_TRITON", True)
    hidden, weight, y = _confident_bf16(4, 32, 150, 0.999, seed=2)
    g = torch.randn(4, generator=torch.Generator().manual_seed(1))
    exact, plain = _exact_and_plain_bf16(hidden, weight, y, g)
    hd = hidden.clone().requires_grad_(True)
    lp, ent = linear_logprobs(hd, weight, y, chunk_size=3, vocab_block=64, entropy=True)
    (grad_h,) = torch.autograd.grad((lp * g).sum(), hd)
    assert _rel(grad_h, exact[2]) <= 2 * _rel(plain[2], exact[2]), (_rel(grad_h, exact[2]), _rel(plain[2], exact[2]))
    ent_err, plain_ent_err = (ent.double() - exact[1]).abs().max(), (plain[1].double() - exact[1]).abs().max()
    assert ent.min() >= 0 and ent_err <= 2 * plain_ent_err + 1e-6, (ent_err, plain_ent_err)


@pytest.mark.parametrize("bad", [50, -1])
def test_out_of_range_target_is_named(bad):
    from uae_fast.errors import ConfigError

    hidden, weight, y = _inputs(6, 8, 50)
    y[4] = bad
    with pytest.raises(ConfigError, match=f"^token id {bad} at position 4 .*vocabulary of 50 entries"):
        linear_logprobs(hidden, weight, y)
    with pytest.raises(ValueError, match="outside the vocabulary"), torch.no_grad():
        linear_logprobs(hidden, weight, y, entropy=True)
