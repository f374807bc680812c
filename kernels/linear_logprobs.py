"""Chosen-token log-probabilities (and entropy) of `softmax(h @ W.T / T)` without materialising [N, V] logits.

The LM head of Qwen2.5-VL has V = 151,936 entries: full fp32 logits for 2,048 completion tokens are 1.2 GB, and
TRL's path holds several such tensors. Here tokens are processed in chunks and, within a chunk, the vocabulary in
blocks with an online (running-max) softmax, like flash attention does over keys. Per block the work is two GEMMs
— `z = h W_bᵀ` and `e W_b` with `e = exp(z - max)` — which are exactly the GEMMs the gradient needs anyway:

    d logp_t / d h_t = (W[y_t] - E_{p_t}[W]) / T,     E_p[W] = Σ_b e_b W_b / Σ_b Σ e_b     (running rescale)

so the backward of a frozen head is a gather and a subtraction — no recompute, no third GEMM. The target's own term
is kept out of that GEMM: `W[y] - E_p[W] = (1 - p_y) W[y] - Σ_{v≠y} p_v W_v`, with 1 - p_y from the fp32 sums. On a
confident token (p_y → 1) E_p[W] ≈ W[y] and the difference is small; taking it after a bf16 GEMM output would leave
bf16 rounding of |W[y]| in a result of size (1 - p_y)|W[y]| (gradient errors growing as 1 / (1 - p_y), entropies
below zero). Split, every low-precision term is already of the result's size. With one block per
chunk (the default, `vocab_block=None`) this is the fastest layout; smaller blocks trade a little speed for memory
(`chunk_size × vocab_block` floats instead of `chunk_size × V`). When W itself needs a gradient the backward
recomputes the logits once (a second pass is unavoidable without knowing the loss gradient in the forward; the
fused GRPO loss in `grpo_loss.py` has a single-pass path for that case).

Layout: Triton kernel → launcher → torch equivalent (CPU path and test oracle) → autograd.Function → public function.
"""

from __future__ import annotations

import math
import os

import torch

from ..errors import ConfigError

try:  # Triton is optional: the torch path below is complete on its own.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

__all__ = [
    "linear_logprobs",
    "linear_logprobs_ref",
    "online_softmax_block",
    "check_token_ids",
    "drop_target",
    "rest_mass",
    "entropy_from_rest",
    "FORCE_TRITON",
]

# Tests set this to run the Triton kernels on CPU tensors under TRITON_INTERPRET=1.
FORCE_TRITON = os.environ.get("UAE_FAST_FORCE_TRITON") == "1"
DEFAULT_CHUNK = 256

if triton is not None:

    @triton.jit
    def _online_softmax_block_kernel(
        z_ptr,  # [c, n] logits block (scaled), overwritten with exp(z - m_new)
        y_ptr,  # [c] target ids (absolute)
        m_ptr,  # [c] running max (in/out)
        s_ptr,  # [c] running Σ exp(z - m) (in/out)
        t_ptr,  # [c] running Σ exp(z - m) (z - m) (in/out), for the entropy
        chosen_ptr,  # [c] target logit (written when the target falls in this block)
        alpha_ptr,  # [c] out: exp(m_old - m_new), to rescale other running sums
        n,
        stride_z,
        block_start,
        FIRST: tl.constexpr,
        ENTROPY: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        z_row = z_ptr + row * stride_z
        y = tl.load(y_ptr + row)
        # pass 1: block max and the target logit
        bmax = -float("inf")
        for off in range(0, n, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            z = tl.load(z_row + cols, mask=cols < n, other=-float("inf"))
            bmax = tl.maximum(bmax, tl.max(z, axis=0))
            hit = cols == (y - block_start)
            tl.store(chosen_ptr + row + cols * 0, z, mask=hit & (cols < n))
        if FIRST:
            m_old = bmax
            s_old = 0.0
            t_old = 0.0
        else:
            m_old = tl.load(m_ptr + row)
            s_old = tl.load(s_ptr + row)
            t_old = tl.load(t_ptr + row)
        m_new = tl.maximum(m_old, bmax)
        alpha = tl.exp(m_old - m_new)
        # pass 2: exponentiate in place and accumulate the sums relative to m_new
        s_blk = 0.0
        t_blk = 0.0
        for off in range(0, n, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            valid = cols < n
            d = tl.where(valid, tl.load(z_row + cols, mask=valid, other=0.0) - m_new, 0.0)
            e = tl.where(valid, tl.exp(d), 0.0)
            tl.store(z_row + cols, e, mask=valid)
            s_blk += tl.sum(e, axis=0)
            if ENTROPY:
                t_blk += tl.sum(tl.where(valid, e * d, 0.0), axis=0)
        tl.store(m_ptr + row, m_new)
        tl.store(s_ptr + row, alpha * s_old + s_blk)
        if ENTROPY:
            tl.store(t_ptr + row, alpha * (t_old + (m_old - m_new) * s_old) + t_blk)
        tl.store(alpha_ptr + row, alpha)


def _online_block_triton(z, y, state, block_start: int, first: bool, entropy: bool) -> torch.Tensor:
    m, s, t, chosen = state
    alpha = torch.empty_like(m)
    block = min(triton.next_power_of_2(z.shape[1]), 4096)
    _online_softmax_block_kernel[(z.shape[0],)](
        z, y, m, s, t, chosen, alpha, z.shape[1], z.stride(0), block_start,
        FIRST=first, ENTROPY=entropy, BLOCK=block,
    )  # fmt: skip
    return alpha


def _online_block_torch(z, y, state, block_start: int, first: bool, entropy: bool) -> torch.Tensor:
    """Same contract as the Triton kernel: update (m, s, t, chosen) in place, z becomes exp(z - m_new)."""
    m, s, t, chosen = state
    n = z.shape[1]
    local = y - block_start
    hit = (local >= 0) & (local < n)
    if bool(hit.any()):
        rows = hit.nonzero().squeeze(1)
        chosen[rows] = z[rows, local[rows]]
    bmax = z.amax(dim=1)  # 4x faster than max(dim=1), which also computes the indices
    m_old = bmax if first else m.clone()
    m_new = torch.maximum(m_old, bmax)
    alpha = torch.exp(m_old - m_new)
    z.sub_(m_new[:, None]).exp_()
    s_blk = z.sum(1)
    if entropy:
        t_blk = torch.xlogy(z, z).sum(1)  # Σ e·log e = Σ e·(z - m_new); xlogy keeps 0·log 0 = 0
    if first:
        s.copy_(s_blk)
        if entropy:
            t.copy_(t_blk)
    else:
        if entropy:
            t.copy_(alpha * (t + (m_old - m_new) * s) + t_blk)
        s.mul_(alpha).add_(s_blk)
    m.copy_(m_new)
    return alpha


def _use_triton(x: torch.Tensor) -> bool:
    return triton is not None and (x.is_cuda or FORCE_TRITON)


def online_softmax_block(z, y, state, block_start: int, first: bool, entropy: bool) -> torch.Tensor:
    """Fold one logits block z [c, n] (fp32, rows or columns contiguous) into the running softmax state, in place.

    state = (max [c], Σ exp(z - max) [c], Σ exp(z - max)(z - max) [c], target logit [c]); z becomes
    exp(z - new max). Returns alpha [c] = exp(old max - new max), the factor for any other running sum.
    """
    update = _online_block_triton if _use_triton(z) else _online_block_torch
    return update(z, y, state, block_start, first, entropy)


def drop_target(e: torch.Tensor, y: torch.Tensor, block_start: int) -> None:
    """Zero each row's target entry of an exponentiated block e [c, n] in place, where the target is in the block.

    Sync-free (a clamped gather/scatter instead of `nonzero`): the E_p[W] GEMM then sums Σ_{v≠y} e_v W_v only.
    """
    n = e.shape[1]
    local = y - block_start
    idx = local.clamp(0, n - 1)[:, None]
    hit = ((local >= 0) & (local < n))[:, None]
    e.scatter_(1, idx, torch.where(hit, 0.0, e.gather(1, idx)))


def rest_mass(chosen: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """1 - p_y [c] from the fp32 softmax sums (max m, Σ exp(z - m) = s, target logit `chosen`), never negative."""
    return (s - torch.exp(chosen - m)).clamp_(min=0.0).div_(s)


def entropy_from_rest(logp, q, lse, hs, pw_rest) -> torch.Tensor:
    """Entropy [c] from quantities the gradient needs anyway: no extra pass over the logits.

    H = -p_y log p_y + Σ_{v≠y} p_v (lse - z_v) = -p_y logp + q·lse - hs·Σ_{v≠y} p_v W_v, with q = 1 - p_y and
    pw_rest [c, H] = Σ_{v≠y} p_v W_v. Leaving the target out keeps the low-precision term of size q instead of
    size 1 (lse - hs·E_p[W] lost the whole entropy of a confident token to bf16 rounding); the clamp removes what
    rounding is left, since an entropy is never negative.
    """
    return (q * lse - (hs * pw_rest).sum(1) - torch.exp(logp) * logp).clamp_(min=0.0)


def check_token_ids(ids: torch.Tensor, vocab: int, positions: torch.Tensor | None = None) -> None:
    """Raise ConfigError naming the first id outside [0, vocab), its position and the vocabulary size.

    One min/max reduction (and one sync) on the fast path. `positions` [n]: where each id sits in the caller's
    tensor (e.g. after masked tokens were dropped). An unchecked id would gather nothing and give logp = -lse.
    """
    if ids.numel() == 0:
        return
    lo, hi = torch.aminmax(ids)
    if int(lo) >= 0 and int(hi) < vocab:
        return
    bad = int(((ids < 0) | (ids >= vocab)).nonzero()[0, 0])
    pos = bad if positions is None else int(positions[bad])
    raise ConfigError(
        f"token id {int(ids[bad])} at position {pos} is outside the vocabulary of {vocab} entries (ids must be in "
        f"[0, {vocab})): do the tokenizer and the LM head match?"
    )


def block_logits(hs: torch.Tensor, w_b: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """fp32 logits block z = hs w_bᵀ [c, n], written into the flat fp32 buffer `buf` (reused: no page faults).

    On the CPU z is stored transposed (a [c, n] view of a contiguous [n, c] tensor), computed as w_b hsᵀ: with the
    vocabulary as the GEMM's long M side MKL runs ~1.5x faster than hs w_bᵀ with a short M (147 vs 88 GFLOPS at
    256 tokens, H 2048, V 152k on this machine's CPU), and the later GEMMs take the view as a transposed operand at
    no cost. The Triton softmax kernel reads rows, so for it z is row-major. A low-precision head runs the GEMM in
    its dtype and keeps the logits in fp32.
    """
    c, n = hs.shape[0], w_b.shape[0]
    rows = _use_triton(hs)
    hs = hs.to(w_b.dtype)
    out, a, b = (buf[: c * n].view(c, n), hs, w_b.t()) if rows else (buf[: c * n].view(n, c), w_b, hs.t())
    if w_b.dtype == torch.float32:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)
    return out if rows else out.t()


def _chunk_forward(h, weight, y, inv_temp, vocab_block, entropy, zbuf, pw_t):
    """One token chunk: logp [c], entropy [c] or None, lse [c], 1 - p_y [c] or None (fp32).

    Unless `pw_t` is None, Σ_{v≠y} p_v W_v (transposed, [H, c]) goes into it: E_p[W] without the target's term,
    accumulated as W_bᵀ eᵀ (~20% faster with MKL than e W_b: long M side again).

    zbuf: flat fp32 buffer of at least c × block floats for the logits block, shared by all chunks and blocks.
    """
    c, vocab = h.shape[0], weight.shape[0]
    block = vocab if vocab_block is None else min(vocab_block, vocab)
    hs = h.float() * inv_temp
    m = torch.empty(c, device=h.device, dtype=torch.float32)
    s, t, chosen = torch.zeros_like(m), torch.zeros_like(m), torch.zeros_like(m)
    # With E_p[W] at hand the entropy is nearly free: z is linear in W, so E_p[z] = hs · E_p[W] (see
    # entropy_from_rest; it saves a pass over the logits that costs ~15% of the step); only the no-grad path pays
    # for Σ p log p per block.
    want_pw = pw_t is not None
    block_entropy = entropy and not want_pw
    for start in range(0, vocab, block):
        w_b = weight[start : start + block]
        z = block_logits(hs, w_b, zbuf)
        alpha = online_softmax_block(z, y, (m, s, t, chosen), start, start == 0, block_entropy)
        if want_pw:
            drop_target(z, y, start)  # the target's term is added back in fp32 (module docstring)
            if start:
                pw_t.mul_(alpha)
            if weight.dtype == torch.float32:
                pw_t.addmm_(w_b.t(), z.t(), beta=1.0 if start else 0.0)
            else:
                e_w = (w_b.t() @ z.t().to(weight.dtype)).float()
                if start:
                    pw_t.add_(e_w)
                else:
                    pw_t.copy_(e_w)
    log_s = torch.log(s)
    lse = m + log_s
    logp = chosen - lse
    q = None
    if want_pw:
        q = rest_mass(chosen, m, s)
        pw_t.div_(s)
    ent = None
    if block_entropy:
        ent = log_s - t / s
    elif entropy:
        ent = entropy_from_rest(logp, q, lse, hs, pw_t.t())
    return logp, ent, lse, q


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, y, temperature, chunk, vocab_block, entropy, want_pw):
        n = h.shape[0]
        inv_temp = 1.0 / temperature
        logp = torch.empty(n, device=h.device, dtype=torch.float32)
        ent = torch.empty_like(logp) if entropy else None
        lse = torch.empty_like(logp)
        pw_t = torch.empty(h.shape[1], n, device=h.device, dtype=torch.float32) if want_pw else None
        q = torch.empty_like(logp) if want_pw else None
        block = weight.shape[0] if vocab_block is None else min(vocab_block, weight.shape[0])
        zbuf = torch.empty(min(chunk, n) * block, device=h.device, dtype=torch.float32)
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            pw_out = pw_t[:, a:b] if want_pw else None
            lp, en, ls, qa = _chunk_forward(h[a:b], weight, y[a:b], inv_temp, vocab_block, entropy, zbuf, pw_out)
            logp[a:b], lse[a:b] = lp, ls
            if entropy:
                ent[a:b] = en
            if want_pw:
                q[a:b] = qa
        ctx.save_for_backward(h, weight, y, lse, None if pw_t is None else pw_t.t(), q)
        ctx.cfg = (inv_temp, chunk, vocab_block)
        if ent is not None:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        h, weight, y, lse, pw_rest, q = ctx.saved_tensors
        inv_temp, chunk, vocab_block = ctx.cfg
        g = grad_logp.float()
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            # (1 - p_y) W[y] - Σ_{v≠y} p_v W_v, in place on one [N, H] temporary: the memory-lean setting's peak
            grad_h = weight[y].float().mul_(q[:, None]).sub_(pw_rest).mul_((g * inv_temp)[:, None]).to(h.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(h, weight, y, lse, g, inv_temp, chunk, vocab_block)
        return grad_h, grad_w, None, None, None, None, None, None


def _weight_grad(h, weight, y, lse, g, inv_temp, chunk, vocab_block):
    """Σ_t g_t (onehot(y_t) - p_t) ⊗ h_t / T, recomputing the logits chunk by chunk (second pass)."""
    vocab = weight.shape[0]
    block = vocab if vocab_block is None else min(vocab_block, vocab)
    grad_w = torch.empty(weight.shape, device=weight.device, dtype=torch.float32)  # the first chunk overwrites it
    zbuf = torch.empty(min(chunk, h.shape[0]) * block, device=h.device, dtype=torch.float32)
    for a in range(0, h.shape[0], chunk):
        hs = h[a : a + chunk].float() * inv_temp
        ga, ya, la = g[a : a + chunk], y[a : a + chunk], lse[a : a + chunk]
        for start in range(0, vocab, block):
            w_b = weight[start : start + block]
            z = block_logits(hs, w_b, zbuf).sub_(la[:, None]).exp_()  # p
            accumulate_head_grad(grad_w[start : start + block], z, ga, ga, hs, ya, start, first=a == 0)
    return grad_w.to(weight.dtype)


def accumulate_head_grad(grad_w, e, e_scale, g, hs, y, start: int, first: bool = False) -> None:
    """grad_w += Σ_t (g_t onehot(y_t - start) - e_scale_t e_t) ⊗ hs_t, in place: the LM head's gradient from one
    chunk and vocabulary block, with d loss / d logits = g (onehot - p) and p = e_scale / g · e.

    grad_w [n, H] fp32 (rows start .. start + n of the head), e [c, n] fp32, e_scale / g [c], hs [c, H] fp32.
    The per-token scale goes on the small [c, H] operand of the GEMM, not on the [c, n] block, and the one-hot
    part is a scatter-add of c rows. `first`: grad_w holds garbage and is overwritten (saves zero-filling [V, H]).
    """
    grad_w.addmm_(e.t(), hs * (-e_scale)[:, None], beta=0.0 if first else 1.0)
    local = y - start
    hit = ((local >= 0) & (local < grad_w.shape[0])).nonzero().squeeze(1)
    if hit.numel():  # index_put_ (accumulating, repeated ids add up): ~12x faster than index_add_ on CPU here
        grad_w.index_put_((local[hit],), hs[hit] * g[hit, None], accumulate=True)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
    vocab_block: int | None = None,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of `targets` under `softmax(hidden @ weight.T / temperature)`, chunked.

    Args:
        hidden: [N, H] final hidden states (any float dtype).
        weight: [V, H] LM head. Its gradient is computed only if it requires grad.
        targets: [N] token ids in [0, V) (others raise ConfigError).
        temperature: divides the logits (sampling temperature).
        chunk_size: tokens per chunk; peak extra memory is about chunk_size × (vocab_block or V) floats.
        vocab_block: vocabulary entries per block (None = whole vocabulary, fastest).
        entropy: also return the per-token entropy (no gradient flows through it).

    Returns:
        (logp [N] fp32, entropy [N] fp32 or None). Differentiable w.r.t. hidden (and weight).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if not temperature > 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    if chunk_size < 1 or (vocab_block is not None and vocab_block < 1):
        raise ValueError("chunk_size and vocab_block must be >= 1")
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32) + hidden.sum() * 0  # keeps the graph connected
        return empty, (empty.detach() if entropy else None)
    targets = targets.long().contiguous()
    check_token_ids(targets, weight.shape[0])
    # E_p[W] is only needed for the input gradient: the no-grad (old / reference policy) passes skip its GEMM.
    want_pw = torch.is_grad_enabled() and hidden.requires_grad
    return _LinearLogProbs.apply(hidden, weight, targets, float(temperature), chunk_size, vocab_block, entropy, want_pw)


def linear_logprobs_ref(hidden, weight, targets, *, temperature: float = 1.0, entropy: bool = False):
    """Reference that materialises the full [N, V] logits (the test oracle): fp32, or fp64 for fp64 inputs."""
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(dtype) @ weight.to(dtype).t() / temperature
    logsm = torch.log_softmax(logits, dim=-1)
    logp = logsm.gather(1, targets.long()[:, None]).squeeze(1)
    ent = -(logsm.exp() * logsm).sum(-1).detach() if entropy else None
    return logp, ent
