"""Every Triton kernel, compiled on CUDA, against its reference in bf16 and fp32 (`pytest -m cuda`).

The numerics rule (DESIGN.md): against an exact oracle (float64 on the same rounded inputs), the kernel's error must
be at most twice that of the plain PyTorch computation in the kernel's dtype, plus a small atol. Shapes are real
(Qwen's 151,936-entry vocabulary, SD3.5 latents, four reward backbones) and awkward (odd sizes, a group of one).
"""

from __future__ import annotations

import math

import pytest
import torch

from uae_fast.kernels import linear_logprobs as llp
from uae_fast.kernels.flow_step import flow_step_logprob
from uae_fast.kernels.grpo_loss import fused_linear_grpo_loss, per_token_loss, token_weights
from uae_fast.kernels.linear_logprobs import linear_logprobs
from uae_fast.kernels.reward import fused_reward

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

QWEN_VOCAB = 151_936
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls(compiled_triton):
    """fp32 means fp32: TF32 GEMMs would put ~1e-3 relative error in the fp32 reference and the kernel alike."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _lm_inputs(n, h, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to("cuda", dtype)
    weight = (torch.randn(v, h, generator=g) * 0.5 / h**0.5 * 4).to("cuda", dtype)
    ids = torch.randint(0, v, (n,), generator=g).cuda()
    return hidden, weight, ids


def _naive_logp(hidden, weight, ids, temperature, dtype):
    """Full logits and log-softmax in `dtype` (what a plain PyTorch loss does), differentiable."""
    logits = (hidden.to(dtype) @ weight.to(dtype).t()) / temperature
    return torch.log_softmax(logits, dim=-1).gather(1, ids[:, None]).squeeze(1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, h, v, chunk, block", [(300, 256, QWEN_VOCAB, 128, None), (37, 24, 1001, 10, 128)])
def test_linear_logprobs(dtype, n, h, v, chunk, block, within_rule):
    hidden, weight, ids = _lm_inputs(n, h, v, dtype)
    g = torch.randn(n, device="cuda")
    temperature = 0.7

    def run(fn, cast):
        hd, wd = hidden.to(cast).requires_grad_(True), weight.to(cast).requires_grad_(True)
        lp = fn(hd, wd)
        return [lp.detach(), *torch.autograd.grad((lp * g.to(lp.dtype)).sum(), [hd, wd])]

    ours = run(
        lambda a, b: linear_logprobs(a, b, ids, temperature=temperature, chunk_size=chunk, vocab_block=block)[0], dtype
    )
    same = run(lambda a, b: _naive_logp(a, b, ids, temperature, dtype), dtype)
    exact = run(lambda a, b: _naive_logp(a, b, ids, temperature, torch.float64), torch.float64)
    assert llp._use_triton(hidden)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype
    for name, o, s, e in zip(("logp", "grad_hidden", "grad_weight"), ours, same, exact):
        within_rule(f"{name} {dtype}", o, s, e)


def _grpo_exact(dtype, hidden, weight, ids, seq_index, adv, mask, old, ref, s, kw):
    """The GRPO loss and its gradients with the log-probs computed in `dtype` (per_token_loss / token_weights are the
    module's own [N]-vector formulas, checked against TRL's on the CPU)."""
    hd, wd = hidden.to(dtype).requires_grad_(True), weight.to(dtype).requires_grad_(True)
    logp = _naive_logp(hd, wd, ids, kw["temperature"], dtype)
    m = mask.to(logp.dtype)
    lengths = torch.zeros(s, device="cuda", dtype=logp.dtype).index_add_(0, seq_index, m).clamp(min=1)
    loss_t, _, _ = per_token_loss(
        logp, old.to(logp.dtype), ref.to(logp.dtype), adv.to(logp.dtype)[seq_index], m, seq_index, lengths,
        beta=kw["beta"], epsilon_low=kw["epsilon_low"], epsilon_high=kw["epsilon_high"],
        importance_sampling_level=kw["importance_sampling_level"],
    )  # fmt: skip
    weights = token_weights(mask, seq_index, s, kw["loss_type"], kw["max_completion_length"]).to(logp.dtype)
    loss = (weights * loss_t).sum()
    return [loss.detach(), logp.detach(), *torch.autograd.grad(loss, [hd, wd])]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "loss_type, level, beta, sequences",
    [("dapo", "token", 0.04, 8), ("grpo", "sequence", 0.0, 5), ("dr_grpo", "token", 0.1, 1)],
)
def test_fused_grpo_loss(dtype, loss_type, level, beta, sequences, within_rule):
    per = 41  # odd sequence length
    n = sequences * per
    hidden, weight, ids = _lm_inputs(n, 128, QWEN_VOCAB, dtype, seed=1)
    gen = torch.Generator().manual_seed(2)
    seq_index = torch.arange(sequences).repeat_interleave(per).cuda()
    mask = (torch.rand(n, generator=gen) > 0.1).float().cuda()
    adv = torch.randn(sequences, generator=gen).cuda()
    with torch.no_grad():
        base = _naive_logp(hidden, weight, ids, 0.7, torch.float64).float()
    old = base + 0.2 * torch.randn(n, generator=gen).cuda()  # ratios on both sides of the clip range
    ref = base + 0.2 * torch.randn(n, generator=gen).cuda()
    kw = dict(beta=beta, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, importance_sampling_level=level,
              temperature=0.7, max_completion_length=per)  # fmt: skip
    for train_head in (False, True):
        hd, wd = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(train_head)
        loss, logp, _ = fused_linear_grpo_loss(
            hd, wd, ids, seq_index, adv, mask=mask, old_logp=old, ref_logp=ref, num_sequences=sequences, **kw
        )
        grads = torch.autograd.grad(loss, [hd, wd] if train_head else [hd])
        ours = [loss.detach(), logp, *grads]
        same = _grpo_exact(dtype, hidden, weight, ids, seq_index, adv, mask, old, ref, sequences, kw)
        exact = _grpo_exact(torch.float64, hidden, weight, ids, seq_index, adv, mask, old, ref, sequences, kw)
        keep = mask.bool()  # masked tokens' log-probs are not computed (dropped before any GEMM)
        ours[1], same[1], exact[1] = ours[1][keep], same[1][keep], exact[1][keep]
        for name, o, s, e in zip(("loss", "logp", "grad_hidden", "grad_weight"), ours, same, exact):
            within_rule(f"{name} {dtype} head={'trainable' if train_head else 'frozen'}", o, s, e)


def _cos_reward(src, rec, index, offsets, weights, dtype):
    s_all, r_all = src.to(dtype)[index], rec.to(dtype)
    total = torch.zeros(rec.shape[0], device="cuda", dtype=dtype)
    cols = []
    for k in range(len(offsets) - 1):
        a, b = int(offsets[k]), int(offsets[k + 1])
        s, r = s_all[:, a:b], r_all[:, a:b]
        cos = (s * r).sum(-1) / (s.norm(dim=-1) * r.norm(dim=-1))
        cols.append(cos)
        total = total + weights[k].to(dtype) * cos
    return total, torch.stack(cols, 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sources, g", [(16, 8), (3, 1)])
def test_fused_reward(dtype, sources, g, within_rule):
    dims = [768, 1024, 1024, 768]  # CLIP-L, LongCLIP-L... widths of four backbones
    offsets = torch.tensor([0, *torch.tensor(dims).cumsum(0).tolist()])
    gen = torch.Generator().manual_seed(3)
    src = torch.randn(sources, offsets[-1], generator=gen)
    rec = (src.repeat_interleave(g, 0) + torch.randn(sources * g, offsets[-1], generator=gen)).to("cuda", dtype)
    src = src.to("cuda", dtype)
    index = torch.arange(sources).repeat_interleave(g).cuda()
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1]).cuda()
    reward, cos, valid = fused_reward(src, rec, index, offsets, weights, backend="triton")
    assert reward.dtype == torch.float32 and bool(valid.all())
    same = _cos_reward(src, rec, index, offsets, weights, dtype)
    exact = _cos_reward(src, rec, index, offsets, weights, torch.float64)
    within_rule(f"reward {dtype}", reward, same[0], exact[0])
    within_rule(f"cos {dtype}", cos, same[1], exact[1])
    # A failed row and a non-finite row get the fill value and are reported invalid.
    rec_bad = rec.clone()
    rec_bad[0, 5] = float("nan")
    failed = torch.zeros(rec.shape[0], dtype=torch.bool, device="cuda")
    failed[-1] = True
    reward, _, valid = fused_reward(src, rec_bad, index, offsets, weights, failed, fill=-1.0, backend="triton")
    assert not valid[0] and not valid[-1] and reward[0] == -1.0 and reward[-1] == -1.0
    if rec.shape[0] > 2:
        assert bool(valid[1:-1].all())


def _flow_naive(v, x, xp, dx, dv, std, v_ref):
    """`flow_step_ref`'s formula computed entirely in the inputs' dtype (the ref itself computes bf16 in fp32)."""
    dtype = v.dtype
    dx, dv, std = dx.to(dtype)[:, None], dv.to(dtype)[:, None], std.to(dtype)
    n = x.shape[1]
    resid = (xp - x) - (dx * x + dv * v)
    log_prob = -resid.square().sum(1) / (2 * std.square() * n) - std.log() - 0.5 * math.log(2 * math.pi)
    kl = (dv * (v - v_ref)).square().sum(1) / (2 * std.square() * n)
    return log_prob, kl


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, n", [(8, 16 * 64 * 64), (3, 16 * 17 * 13)])  # SD3.5 latents at 512², an odd size
def test_flow_step(dtype, b, n, within_rule):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(b, n, generator=gen)
    v = torch.randn(b, n, generator=gen)
    v_ref = v + 0.05 * torch.randn(b, n, generator=gen)
    dx, dv = -0.05 * torch.rand(b, generator=gen), -0.05 - 0.05 * torch.rand(b, generator=gen)
    std = 0.05 + 0.1 * torch.rand(b, generator=gen)
    xp = x + dx[:, None] * x + dv[:, None] * v + std[:, None] * torch.randn(b, n, generator=gen)
    x, v, v_ref, xp = (t.to("cuda", dtype) for t in (x, v, v_ref, xp))
    dx, dv, std = dx.cuda(), dv.cuda(), std.cuda()
    gw = torch.randn(b, device="cuda")

    def run(backend, cast):
        vv = v.to(cast).requires_grad_(True)
        args = (x.to(cast), xp.to(cast), dx, dv, std, v_ref.to(cast))
        fn = {"triton": lambda *a: flow_step_logprob(*a, backend="triton"), "naive": _flow_naive}[backend]
        lp, kl = fn(vv, *args)
        (grad,) = torch.autograd.grad((lp * gw).sum() + (kl * gw).sum(), [vv])
        return [lp.detach(), kl.detach(), grad]

    ours, same, exact = run("triton", dtype), run("naive", dtype), run("naive", torch.float64)
    for name, o, s, e in zip(("log_prob", "kl", "grad_velocity"), ours, same, exact):
        within_rule(f"{name} {dtype}", o, s, e, rel_atol=1e-6)
