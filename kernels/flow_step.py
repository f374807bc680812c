"""Log-density and KL of Flow-GRPO's Gaussian step, fused over each sample's latents, with the velocity gradient.

A stochastic flow-matching step (see `uae_fast.rl.flow_grpo`) turns latents x into x' ~ N(μ, std²·I) with a mean
that is affine in the latents x and the velocity v, with per-sample scalars (row b, N latent elements):

    μ          = x + drift,   drift = drift_x[b] · x + drift_v[b] · v
    log_prob_b = -Σ_i (x'_i - μ_i)² / (2 std_b² N) - log std_b - ½ log 2π        (the Gaussian log-density, mean over i)
    kl_b       = Σ_i (μ_i - μref_i)² / (2 std_b² N) = drift_v[b]² Σ_i (v_i - vref_i)² / (2 std_b² N)

(kl: the closed-form KL between two Gaussians of equal std whose means differ only through the velocity, mean over
i.) Both are sums of squares over the row, so one pass over (x, v, x', vref) gives them; their gradients w.r.t. the
velocity are elementwise:

    d log_prob_b / d v_i = drift_v[b] (x'_i - μ_i) / (std_b² N)
    d kl_b / d v_i       = drift_v[b]² (v_i - vref_i) / (std_b² N)

so the backward is one more pass over the same tensors, with nothing saved but the inputs. x' - μ is computed as
(x' - x) - drift: a step moves the latents by little, so subtracting the two O(1) tensors first keeps the small
residual accurate in fp32 where x' - (x + drift) would cancel.

Inputs may be bf16 or fp32; everything is accumulated in fp32 (float64 inputs stay float64 on the PyTorch path, for
gradcheck). Rows are split into chunks, one program each, whose partial sums are added by torch: deterministic, and
enough programs to fill a GPU with B = 8 rows. ``flow_step_ref`` is the CPU path and the test oracle (gradients by
autograd); ``flow_step_logprob`` dispatches.
"""

from __future__ import annotations

import math
import os

import torch

from .reward import triton_available

try:  # Triton is optional: without it (or without a GPU) everything runs through flow_step_ref.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None

__all__ = ["flow_step_logprob", "flow_step_ref", "triton_available"]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
BLOCK = 1024  # elements per vector op: 4 warps × 32 threads × 8 fp32
ITERS = 4  # blocks per program: 4096 elements, so a 16×64×64 row is 16 programs and B = 8 fills 128 SMs

if triton is not None:

    @triton.jit
    def _flow_step_fwd_kernel(
        x_ptr,  # [B, N] latents, any float dtype
        v_ptr,  # [B, N] velocity
        xp_ptr,  # [B, N] prev_sample x'
        vref_ptr,  # [B, N] reference velocity (any tensor when HAS_REF is False: never read)
        drift_x_ptr,  # [B] float32
        drift_v_ptr,  # [B] float32
        sq_ptr,  # [B, num_chunks] float32 out: partial Σ (x' - μ)²
        kl_ptr,  # [B, num_chunks] float32 out: partial Σ (v - vref)²
        n,
        num_chunks,
        HAS_REF: tl.constexpr,
        BLOCK: tl.constexpr,
        ITERS: tl.constexpr,
    ):
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        base = row.to(tl.int64) * n
        dx = tl.load(drift_x_ptr + row)
        dv = tl.load(drift_v_ptr + row)
        cols = tl.arange(0, BLOCK)
        acc_sq = tl.zeros([BLOCK], dtype=tl.float32)
        acc_kl = tl.zeros([BLOCK], dtype=tl.float32)
        for i in tl.static_range(ITERS):
            idx = (chunk * ITERS + i) * BLOCK + cols
            mask = idx < n
            x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
            xp = tl.load(xp_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
            resid = (xp - x) - (dx * x + dv * v)  # masked lanes load 0 everywhere: resid 0
            acc_sq += resid * resid
            if HAS_REF:
                vr = tl.load(vref_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
                acc_kl += (v - vr) * (v - vr)
        out = row * num_chunks + chunk
        tl.store(sq_ptr + out, tl.sum(acc_sq, axis=0))
        tl.store(kl_ptr + out, tl.sum(acc_kl, axis=0))

    @triton.jit
    def _flow_step_bwd_kernel(
        x_ptr,
        v_ptr,
        xp_ptr,
        vref_ptr,
        drift_x_ptr,  # [B] float32
        drift_v_ptr,  # [B] float32
        scale_lp_ptr,  # [B] float32: grad_log_prob · drift_v / (std² N)
        scale_kl_ptr,  # [B] float32: grad_kl · drift_v² / (std² N)
        grad_ptr,  # [B, N] out, the velocity's dtype
        n,
        HAS_REF: tl.constexpr,
        BLOCK: tl.constexpr,
        ITERS: tl.constexpr,
    ):
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        base = row.to(tl.int64) * n
        dx = tl.load(drift_x_ptr + row)
        dv = tl.load(drift_v_ptr + row)
        s_lp = tl.load(scale_lp_ptr + row)
        s_kl = tl.load(scale_kl_ptr + row)
        cols = tl.arange(0, BLOCK)
        for i in tl.static_range(ITERS):
            idx = (chunk * ITERS + i) * BLOCK + cols
            mask = idx < n
            x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
            xp = tl.load(xp_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
            grad = s_lp * ((xp - x) - (dx * x + dv * v))
            if HAS_REF:
                vr = tl.load(vref_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
                grad += s_kl * (v - vr)
            tl.store(grad_ptr + base + idx, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _grid(b: int, n: int, block: int, iters: int) -> tuple[int, int]:
    return (b, triton.cdiv(n, block * iters))


def _tile(n: int, block: int | None, iters: int | None) -> tuple[int, int]:
    # Small rows (tests, tiny models) get one small block rather than a mostly masked 1024-wide one.
    block = block or min(BLOCK, triton.next_power_of_2(max(n, 16)))
    return block, iters or ITERS


class _FlowStepTriton(torch.autograd.Function):
    """Forward and backward kernels; gradient w.r.t. the velocity only (the other inputs are rollout data)."""

    @staticmethod
    def forward(ctx, velocity, latents, prev_sample, ref_velocity, drift_x, drift_v, std, tile):
        b, n = velocity.shape
        block, iters = tile
        grid = _grid(b, n, block, iters)
        sq = torch.empty(grid, dtype=torch.float32, device=velocity.device)
        kl_sq = torch.empty_like(sq)
        has_ref = ref_velocity is not None
        vref = ref_velocity if has_ref else velocity
        _flow_step_fwd_kernel[grid](
            latents, velocity, prev_sample, vref, drift_x, drift_v, sq, kl_sq, n, grid[1],
            HAS_REF=has_ref, BLOCK=block, ITERS=iters,
        )  # fmt: skip
        inv_var_n = 1.0 / (std * std * n)
        log_prob = -0.5 * inv_var_n * sq.sum(1) - std.log() - _HALF_LOG_2PI
        kl = 0.5 * drift_v * drift_v * inv_var_n * kl_sq.sum(1)
        ctx.save_for_backward(latents, velocity, prev_sample, vref, drift_x, drift_v, inv_var_n)
        ctx.has_ref, ctx.tile = has_ref, tile
        return log_prob, kl

    @staticmethod
    def backward(ctx, grad_log_prob, grad_kl):
        latents, velocity, prev_sample, vref, drift_x, drift_v, inv_var_n = ctx.saved_tensors
        b, n = velocity.shape
        block, iters = ctx.tile
        scale_lp = (grad_log_prob * drift_v * inv_var_n).float().contiguous()
        scale_kl = (grad_kl * drift_v * drift_v * inv_var_n).float().contiguous()
        grad = torch.empty_like(velocity)
        _flow_step_bwd_kernel[_grid(b, n, block, iters)](
            latents, velocity, prev_sample, vref, drift_x, drift_v, scale_lp, scale_kl, grad, n,
            HAS_REF=ctx.has_ref, BLOCK=block, ITERS=iters,
        )  # fmt: skip
        return grad, None, None, None, None, None, None, None


def flow_step_ref(
    velocity: torch.Tensor,
    latents: torch.Tensor,
    prev_sample: torch.Tensor,
    drift_x: torch.Tensor,
    drift_v: torch.Tensor,
    std: torch.Tensor,
    ref_velocity: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pure-PyTorch :func:`flow_step_logprob` (same arguments and results); gradients by autograd."""
    wide = any(t is not None and t.dtype == torch.float64 for t in (velocity, latents, prev_sample, ref_velocity))
    dtype = torch.float64 if wide else torch.float32
    x, v, xp = latents.detach().to(dtype), velocity.to(dtype), prev_sample.detach().to(dtype)
    dx, dv, std = drift_x.to(dtype)[:, None], drift_v.to(dtype)[:, None], std.to(dtype)
    n = x.shape[1]
    resid = (xp - x) - (dx * x + dv * v)
    log_prob = -resid.square().sum(1) / (2 * std.square() * n) - std.log() - _HALF_LOG_2PI
    if ref_velocity is None:
        return log_prob, None
    kl = (dv * (v - ref_velocity.detach().to(dtype))).square().sum(1) / (2 * std.square() * n)
    return log_prob, kl


def flow_step_logprob(
    velocity: torch.Tensor,
    latents: torch.Tensor,
    prev_sample: torch.Tensor,
    drift_x: torch.Tensor,
    drift_v: torch.Tensor,
    std: torch.Tensor,
    ref_velocity: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    tile: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sample Gaussian log-density of a stored step, and its KL to a reference policy's step.

    Args:
        velocity: [B, N] the policy's velocity (differentiable), bf16 / fp32 / float64.
        latents: [B, N] the latents x the step started from (no gradient).
        prev_sample: [B, N] where the step landed, x' (no gradient).
        drift_x, drift_v: [B] the mean's coefficients, μ = x + drift_x·x + drift_v·v.
        std: [B] the transition std, > 0.
        ref_velocity: optional [B, N] the reference policy's velocity (no gradient).
        backend: "auto" (Triton on CUDA tensors, else PyTorch), "triton" or "torch".
        tile: (block, blocks per program) of the kernel; default fits a GPU (tests use small tiles).

    Returns:
        log_prob [B] and kl [B] (None without ``ref_velocity``), both means over the N elements; fp32 (float64 for
        float64 velocity on the PyTorch path).
    """
    b = velocity.shape[0]
    if velocity.dim() != 2:
        raise ValueError(f"velocity must be [B, N], got {tuple(velocity.shape)}")
    named = (("latents", latents), ("prev_sample", prev_sample), ("ref_velocity", ref_velocity))
    for name, t in named:
        if t is not None and t.shape != velocity.shape:
            raise ValueError(f"{name} must be [B, N] = {tuple(velocity.shape)} like velocity, got {tuple(t.shape)}")
    for name, t in (("drift_x", drift_x), ("drift_v", drift_v), ("std", std)):
        if t.shape != (b,):
            raise ValueError(f"{name} must be [B] = [{b}], got {tuple(t.shape)}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and velocity.is_cuda and triton is not None)
    if not use_triton:
        return flow_step_ref(velocity, latents, prev_sample, drift_x, drift_v, std, ref_velocity)
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package and a CUDA device (or TRITON_INTERPRET=1)")
    if not velocity.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before uae_fast is imported")
    if velocity.dtype == torch.float64:
        raise ValueError("the Triton kernel takes bf16 / fp16 / fp32 inputs; use backend='torch' for float64")
    dev = velocity.device
    scalars = [t.detach().to(device=dev, dtype=torch.float32).contiguous() for t in (drift_x, drift_v, std)]
    ref = None if ref_velocity is None else ref_velocity.detach().contiguous()
    log_prob, kl = _FlowStepTriton.apply(
        velocity.contiguous(), latents.detach().contiguous(), prev_sample.detach().contiguous(), ref, *scalars,
        _tile(velocity.shape[1], *(tile or (None, None))),
    )  # fmt: skip
    return log_prob, (kl if ref_velocity is not None else None)
