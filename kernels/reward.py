"""Fused reconstruction reward: per-backbone L2 normalisation, group-indexed cosine and the weighted sum, in one pass.

For N reconstructions, each belonging to one of S source images (row ``index[n]``), and K backbones whose features
are stored side by side in one row (backbone k owns columns ``offsets[k]:offsets[k+1]``):

    cos[n, k]  = <s_k, r_k> / (max(|s_k|, eps) · max(|r_k|, eps)),   s = src[index[n]], r = rec[n]
    reward[n]  = Σ_k weights[k] · cos[n, k]

The source row is gathered by index, so the S source feature rows are read G times from cache but never copied or
recomputed per pair. A row is *invalid* when any of its features (source or reconstruction, any backbone) is NaN or
inf, or when the caller marked the reconstruction as failed: its reward and cosines are set to ``fill`` and
``valid[n]`` is False, so no NaN can reach an optimiser.

There is no autograd.Function: the reward is the environment's signal and is never differentiated (the cold-start
loss, which is, uses its own op). ``reward_ref`` is the CPU path, the test oracle and the benchmark baseline.
"""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: without it (or without a GPU) everything runs through reward_ref.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None

__all__ = ["fused_reward", "reward_ref", "triton_available"]

_EPS = 1e-12  # F.normalize's default: a zero feature vector gives cosine 0, not NaN


def triton_available() -> bool:
    """True when Triton kernels can run: a CUDA device, or the CPU interpreter (TRITON_INTERPRET=1)."""
    if triton is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _reward_kernel(
        src_ptr,  # [S, D] features of the sources, any float dtype
        rec_ptr,  # [N, D] features of the reconstructions
        index_ptr,  # [N] int64 source row of each reconstruction
        offsets_ptr,  # [K + 1] int32 column offsets of the backbones
        weights_ptr,  # [K] float32
        failed_ptr,  # [N] int8, 1 = reconstruction failed upstream
        reward_ptr,  # [N] float32 out
        cos_ptr,  # [N, K] float32 out
        valid_ptr,  # [N] int8 out
        src_stride,
        rec_stride,
        fill,
        eps,
        K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0)
        src_row = tl.load(index_ptr + row).to(tl.int64)
        src_base = src_ptr + src_row * src_stride
        rec_base = rec_ptr + row.to(tl.int64) * rec_stride
        cols = tl.arange(0, BLOCK_D)
        ok = tl.load(failed_ptr + row) == 0
        reward = 0.0
        for k in tl.static_range(K):
            start = tl.load(offsets_ptr + k)
            end = tl.load(offsets_ptr + k + 1)
            # fp32 accumulators whatever the feature dtype: bf16 dot products of 1024-d vectors lose ~3 digits.
            dot = tl.zeros([BLOCK_D], dtype=tl.float32)
            ss = tl.zeros([BLOCK_D], dtype=tl.float32)
            rr = tl.zeros([BLOCK_D], dtype=tl.float32)
            for d in range(start, end, BLOCK_D):
                mask = d + cols < end
                s = tl.load(src_base + d + cols, mask=mask, other=0.0).to(tl.float32)
                r = tl.load(rec_base + d + cols, mask=mask, other=0.0).to(tl.float32)
                dot += s * r
                ss += s * s
                rr += r * r
            dot_k = tl.sum(dot, axis=0)
            ss_k = tl.sum(ss, axis=0)
            rr_k = tl.sum(rr, axis=0)
            # A squared norm is inf for any inf/huge element and NaN for any NaN element: one test covers both.
            finite = (ss_k < float("inf")) & (rr_k < float("inf")) & (dot_k == dot_k) & (tl.abs(dot_k) < float("inf"))
            denom = tl.maximum(tl.sqrt(ss_k), eps) * tl.maximum(tl.sqrt(rr_k), eps)
            # Divide only finite values: NaN / inf never enter an arithmetic op whose result is kept.
            cos_k = tl.where(finite, dot_k, 0.0) / tl.where(finite, denom, 1.0)
            ok = ok & finite
            reward += tl.load(weights_ptr + k) * cos_k
            tl.store(cos_ptr + row * K + k, cos_k)
        for k in tl.static_range(K):  # second pass: an invalid row gets `fill` in every column, not partial values
            c = tl.load(cos_ptr + row * K + k)
            tl.store(cos_ptr + row * K + k, tl.where(ok, c, fill))
        tl.store(reward_ptr + row, tl.where(ok, reward, fill))
        tl.store(valid_ptr + row, ok.to(tl.int8))


def _launch(src, rec, index, offsets, weights, failed, fill, eps):
    n, k = rec.shape[0], weights.numel()
    reward = torch.empty(n, dtype=torch.float32, device=rec.device)
    cos = torch.empty(n, k, dtype=torch.float32, device=rec.device)
    valid = torch.empty(n, dtype=torch.int8, device=rec.device)
    if n == 0:
        return reward, cos, valid.bool()
    widest = int((offsets[1:] - offsets[:-1]).max())
    block = min(1024, triton.next_power_of_2(max(widest, 16)))
    _reward_kernel[(n,)](
        src,
        rec,
        index,
        offsets,
        weights,
        failed,
        reward,
        cos,
        valid,
        src.stride(0),
        rec.stride(0),
        float(fill),
        float(eps),
        K=k,
        BLOCK_D=block,
    )
    return reward, cos, valid.bool()


def reward_ref(
    src: torch.Tensor,
    rec: torch.Tensor,
    index: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor,
    failed: torch.Tensor | None = None,
    *,
    fill: float = 0.0,
    eps: float = _EPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-PyTorch reference of :func:`fused_reward` (same arguments and results), computed in float32."""
    bounds = [int(o) for o in offsets.tolist()]
    s_all = src.float()[index.long()]  # [N, D]; the kernel gathers the same rows without this copy
    r_all = rec.float()
    ok = torch.ones(rec.shape[0], dtype=torch.bool, device=rec.device)
    if failed is not None:
        ok &= ~failed.bool()
    cols = []
    for k in range(len(bounds) - 1):
        s, r = s_all[:, bounds[k] : bounds[k + 1]], r_all[:, bounds[k] : bounds[k + 1]]
        dot, ss, rr = (s * r).sum(-1), (s * s).sum(-1), (r * r).sum(-1)
        finite = torch.isfinite(ss) & torch.isfinite(rr) & torch.isfinite(dot)
        denom = ss.sqrt().clamp_min(eps) * rr.sqrt().clamp_min(eps)
        cols.append(torch.where(finite, dot / denom, torch.zeros_like(dot)))
        ok &= finite
    cos = torch.stack(cols, dim=1) if cols else r_all.new_zeros(rec.shape[0], 0)
    reward = (cos * weights.float().to(cos.device)).sum(-1)
    reward = torch.where(ok, reward, torch.full_like(reward, fill))
    cos = torch.where(ok[:, None], cos, torch.full_like(cos, fill))
    return reward, cos, ok


def fused_reward(
    src: torch.Tensor,
    rec: torch.Tensor,
    index: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor,
    failed: torch.Tensor | None = None,
    *,
    fill: float = 0.0,
    eps: float = _EPS,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted multi-backbone cosine reward of reconstructions against their sources.

    Args:
        src: Source features [S, D] (backbones concatenated along D), any float dtype.
        rec: Reconstruction features [N, D], same layout.
        index: [N] integer row of ``src`` each reconstruction belongs to (``n // G`` for image-major groups).
        offsets: [K + 1] column offsets of the K backbones (``offsets[0] = 0``, ``offsets[K] = D``).
        weights: [K] weight of each backbone.
        failed: Optional [N] bool, True for reconstructions that failed upstream (always invalid).
        fill: Reward and cosine written for invalid rows.
        eps: Lower bound of each norm, as in ``F.normalize``.
        backend: "auto" (Triton on CUDA tensors, else PyTorch), "triton" or "torch".

    Returns:
        rewards [N] float32, cos [N, K] float32 (per-backbone cosine), valid [N] bool.
    """
    if rec.dim() != 2 or src.dim() != 2 or src.shape[1] != rec.shape[1]:
        raise ValueError(f"src [S, D] and rec [N, D] must share D, got {tuple(src.shape)} and {tuple(rec.shape)}")
    if index.shape != (rec.shape[0],):
        raise ValueError(f"index must be [N] = [{rec.shape[0]}], got {tuple(index.shape)}")
    if offsets.numel() != weights.numel() + 1:
        raise ValueError(f"offsets must have K + 1 = {weights.numel() + 1} entries, got {offsets.numel()}")
    if failed is not None and failed.shape != (rec.shape[0],):
        raise ValueError(f"failed must be [N] = [{rec.shape[0]}], got {tuple(failed.shape)}")
    use_triton = backend == "triton" or (backend == "auto" and rec.is_cuda and triton is not None)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if not use_triton:
        return reward_ref(src, rec, index, offsets, weights, failed, fill=fill, eps=eps)
    if triton is None:
        raise RuntimeError("backend='triton' needs the triton package")
    if not rec.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before uae_fast is imported")
    dev = rec.device
    if failed is None:
        failed = torch.zeros(rec.shape[0], dtype=torch.int8, device=dev)
    return _launch(
        src.contiguous(),
        rec.contiguous(),
        index.to(device=dev, dtype=torch.int64).contiguous(),
        offsets.to(device=dev, dtype=torch.int32).contiguous(),
        weights.to(device=dev, dtype=torch.float32).contiguous(),
        failed.to(device=dev, dtype=torch.int8).contiguous(),
        fill,
        eps,
    )
