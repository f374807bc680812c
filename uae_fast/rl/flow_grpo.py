"""Flow-GRPO for the decoder (stage 2b): the flow-matching Euler step as a Gaussian policy, its log-density, and the
clipped policy loss.

An Euler step of a flow-matching sampler moves latents x at noise level σ to σ' < σ (σ runs from ~1 down to 0) along
the predicted velocity v. Flow-GRPO makes the step stochastic, x' ~ N(μ, std²·I), so that each step is a policy action
with a log-probability. Two constructions, named by ``sde_type`` (``uae_fast.rl.config.SDE_TYPES``), with a =
``noise_level`` and dt = σ' - σ < 0:

- "sde" (Flow-GRPO's SDE): s = a·sqrt(σ / (1 - σ)), with 1 - σ' in the denominator at σ = 1 (flow_grpo's choice);
  μ = x·(1 + s²/(2σ)·dt) + v·(1 + s²(1 - σ)/(2σ))·dt;  std = s·sqrt(-dt).
- "cps" (coefficients-preserving sampling): std = σ'·sin(aπ/2); x0 = x - σv; x1 = x + (1 - σ)v;
  μ = x0·(1 - σ') + x1·sqrt(σ'² - std²).

Both means are affine in (x, v) with per-sample scalars, μ = x + drift_x·x + drift_v·v; the scalars and std are
computed once, in float64 on the CPU, by ``_transition_coefficients``, which `sde_step` and `transition_logprob`
share. The log-probability is the true Gaussian log-density, averaged over the latent elements, for both types
(flow_grpo's "cps" drops the constants and the 1/(2std²) scale; we do not, so ratios and clip ranges mean the same for
both types). A step with std = 0 (cps at σ' = 0, or noise_level = 0) is deterministic and has no density: asking for
its log-probability raises. The per-row sums and the velocity gradient are fused in `uae_fast.kernels.flow_step`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..kernels.flow_step import flow_step_logprob
from .config import SDE_TYPES

__all__ = ["SDE_TYPES", "SDEStep", "sde_step", "transition_logprob", "flow_grpo_loss"]


@dataclass
class SDEStep:
    prev_sample: torch.Tensor  # [B, ...] x', fp32 (float64 for float64 inputs)
    log_prob: torch.Tensor  # [B] Gaussian log-density of x', mean over latent elements
    mean: torch.Tensor  # [B, ...] μ, fp32
    std: torch.Tensor  # [B] transition std, same for every element of a sample


@dataclass
class _Coefficients:  # float64 on the CPU, [B] each: μ = x + drift_x·x + drift_v·v, x' ~ N(μ, std²)
    drift_x: torch.Tensor
    drift_v: torch.Tensor
    std: torch.Tensor
    sigma: torch.Tensor
    sigma_next: torch.Tensor


def _per_sample(value, name: str, batch: int) -> torch.Tensor:
    # A Python float goes straight to float64: torch.as_tensor(0.95) would round it through fp32 first.
    t = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=torch.float64)
    t = t.to(device="cpu", dtype=torch.float64).reshape(-1)
    if t.numel() == 1:
        return t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"{name} must be a float or [B] = [{batch}] values, got {t.numel()} values")
    return t


def _transition_coefficients(sigma, sigma_next, noise_level: float, sde_type: str, batch: int) -> _Coefficients:
    """The one place where σ, σ', noise_level and sde_type become the Gaussian's mean coefficients and std."""
    if sde_type not in SDE_TYPES:
        raise ConfigError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")
    a = float(noise_level)
    if not (math.isfinite(a) and a >= 0):
        raise ConfigError(f"noise_level must be a finite number >= 0, got {noise_level!r}")
    s, s_next = _per_sample(sigma, "sigma", batch), _per_sample(sigma_next, "sigma_next", batch)
    bad = ~((0 <= s_next) & (s_next < s) & (s <= 1))  # also catches NaN
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"need 0 <= sigma_next < sigma <= 1, got sigma={s[i]:.9g}, sigma_next={s_next[i]:.9g}")
    dt = s_next - s
    if sde_type == "sde":
        # At σ = 1, σ/(1 - σ) is infinite: flow_grpo takes 1 - σ' there (its sigmas[1] is σ' at the first step).
        denom = torch.where(s == 1, 1 - s_next, 1 - s)
        # s²/(2σ) = a²/(2·denom): written without the division by σ, which would lose digits as σ → 0.
        drift_x = a * a / (2 * denom) * dt
        drift_v = (1 + a * a * (1 - s) / (2 * denom)) * dt
        std = a * torch.sqrt(s / denom) * torch.sqrt(-dt)
    else:
        std = s_next * math.sin(a * math.pi / 2)
        # sqrt(σ'² - std²) = σ'·|cos(aπ/2)| exactly; the subtraction could round below 0 and give NaN.
        keep = s_next * abs(math.cos(a * math.pi / 2))
        drift_x = keep - s_next  # c_x - 1, c_x = (1 - σ') + keep
        drift_v = (1 - s) * keep - s * (1 - s_next)
    return _Coefficients(drift_x, drift_v, std, s, s_next)


def _require_density(c: _Coefficients, sde_type: str, noise_level: float) -> None:
    zero = c.std == 0
    if bool(zero.any()):
        i = int(zero.nonzero()[0])
        raise ValueError(
            f"the {sde_type!r} step from sigma={c.sigma[i]:.9g} to sigma_next={c.sigma_next[i]:.9g} with "
            f"noise_level={noise_level} is deterministic (std 0) and has no log-density: take it as a plain "
            "Euler step and leave it out of training"
        )


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    # fp32 whatever the input (bf16 means overflow and cancel); float64 stays float64 so gradcheck can run.
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _on(c: _Coefficients, like: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device=like.device, dtype=dtype) for t in (c.drift_x, c.drift_v, c.std))


def _check_shapes(velocity: torch.Tensor, **others: torch.Tensor | None) -> None:
    if velocity.dim() < 2:
        raise ValueError(f"velocity must be [B, ...] latents-shaped, got {tuple(velocity.shape)}")
    for name, t in others.items():
        if t is not None and t.shape != velocity.shape:
            raise ValueError(f"{name} must have the velocity's shape {tuple(velocity.shape)}, got {tuple(t.shape)}")


def sde_step(
    velocity: torch.Tensor,
    latents: torch.Tensor,
    sigma,
    sigma_next,
    *,
    noise_level: float = 0.7,
    sde_type: str = "sde",
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> SDEStep:
    """One stochastic Euler step from σ to σ' (module docstring), sampled or evaluated.

    Args:
        velocity: [B, ...] the predicted velocity (bf16 / fp32).
        latents: [B, ...] x at σ.
        sigma, sigma_next: floats or [B] tensors, 0 <= σ' < σ <= 1.
        noise_level: a >= 0. sde_type: "sde" or "cps".
        prev_sample: [B, ...] a stored x' to evaluate; None draws x' = μ + std·ε with one ``generator`` draw of the
            latents' shape (a CPU generator is fine for CUDA latents: the draw is moved).
        generator: torch.Generator for ε, or B of them, one per row (each row's ε then does not depend on the batch
            it is drawn in: what a distributed run needs to draw as one process does).

    Returns:
        SDEStep(prev_sample, log_prob [B], mean, std [B]); log_prob is the true Gaussian log-density (constants
        included, also for "cps", unlike flow_grpo), mean over elements, from the code of :func:`transition_logprob`.

    Raises:
        ValueError: a step with std = 0 (cps at σ' = 0, noise_level = 0), which has no log-density.
    """
    _check_shapes(velocity, latents=latents, prev_sample=prev_sample)
    coef = _transition_coefficients(sigma, sigma_next, noise_level, sde_type, latents.shape[0])
    _require_density(coef, sde_type, noise_level)
    dtype = _compute_dtype(velocity, latents)
    drift_x, drift_v, std = _on(coef, latents, dtype)
    view = (-1,) + (1,) * (latents.dim() - 1)
    x, v = latents.to(dtype), velocity.to(dtype)
    mean = x + (drift_x.view(view) * x + drift_v.view(view) * v)
    if prev_sample is None:
        if isinstance(generator, (list, tuple)):
            noise = torch.stack(
                [torch.randn(latents.shape[1:], generator=g, device=g.device, dtype=dtype) for g in generator]
            ).to(latents.device)
        else:
            draw_on = generator.device if generator is not None else latents.device
            noise = torch.randn(latents.shape, generator=generator, device=draw_on, dtype=dtype).to(latents.device)
        prev_sample = mean + std.view(view) * noise
    else:
        prev_sample = prev_sample.to(dtype)
    b = latents.shape[0]
    log_prob, _ = flow_step_logprob(
        v.reshape(b, -1), x.reshape(b, -1), prev_sample.reshape(b, -1), drift_x, drift_v, std
    )
    return SDEStep(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std)


def transition_logprob(
    velocity: torch.Tensor,
    latents: torch.Tensor,
    prev_sample: torch.Tensor,
    sigma,
    sigma_next,
    *,
    noise_level: float,
    sde_type: str,
    ref_velocity: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training-time log-probability of stored steps under the current policy, and the KL to the reference.

    Args:
        velocity: [B, ...] the policy's velocity; the only input that gets a gradient.
        latents, prev_sample: [B, ...] the stored step x → x' (no gradient).
        sigma, sigma_next, noise_level, sde_type: as :func:`sde_step`.
        ref_velocity: optional [B, ...] the reference policy's velocity (no gradient).
        backend: "auto" (the fused Triton kernel on CUDA tensors, else PyTorch), "triton" (also CPU tensors under
            TRITON_INTERPRET=1) or "torch".

    Returns:
        log_prob [B] (Gaussian log-density, mean over latent elements) and kl [B] = ‖μθ - μref‖² / (2 std²) as a mean
        over latent elements — the closed-form KL of the two Gaussians, which share std — or None without
        ``ref_velocity``. fp32 (float64 for float64 inputs).
    """
    _check_shapes(velocity, latents=latents, prev_sample=prev_sample, ref_velocity=ref_velocity)
    b = velocity.shape[0]
    coef = _transition_coefficients(sigma, sigma_next, noise_level, sde_type, b)
    _require_density(coef, sde_type, noise_level)
    drift_x, drift_v, std = _on(coef, velocity, _compute_dtype(velocity, latents, prev_sample, ref_velocity))
    ref = None if ref_velocity is None else ref_velocity.detach().reshape(b, -1)
    return flow_step_logprob(
        velocity.reshape(b, -1), latents.detach().reshape(b, -1), prev_sample.detach().reshape(b, -1),
        drift_x, drift_v, std, ref, backend=backend,
    )  # fmt: skip


def flow_grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float,
    beta: float = 0.0,
    kl: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow-GRPO's per-sample PPO-clipped objective for one denoising step of B samples.

    loss = mean_b max(-A_b·r_b, -A_b·clip(r_b, 1 - ε, 1 + ε)) + beta·mean_b kl_b, r_b = exp(log_prob_b - old_b).
    Advantages are used as given: clipping them to ±adv_clip_max (as flow_grpo does) is the caller's job.

    Args:
        log_prob: [B] from :func:`transition_logprob` (differentiable).
        old_log_prob: [B] the same step's log-prob under the rollout policy (no gradient).
        advantages: [B] (no gradient).
        clip_range: ε >= 0. beta: KL coefficient >= 0; beta > 0 needs ``kl`` [B].

    Returns:
        (loss scalar, metrics) — metrics (detached scalars): clip_ratio (fraction with |r - 1| > ε), approx_kl
        (0.5·mean((log_prob - old)²)), ratio (mean r) and, when ``kl`` is given, kl (its mean).
    """
    b = log_prob.shape
    if log_prob.dim() != 1 or log_prob.numel() == 0:
        raise ValueError(f"log_prob must be [B] with B >= 1, got {tuple(log_prob.shape)}")
    for name, t in (("old_log_prob", old_log_prob), ("advantages", advantages), ("kl", kl)):
        if t is not None and t.shape != b:
            raise ValueError(f"{name} must be [B] = {list(b)} like log_prob, got {tuple(t.shape)}")
    if not clip_range >= 0:
        raise ConfigError(f"clip_range must be >= 0, got {clip_range}")
    if not beta >= 0:
        raise ConfigError(f"beta must be >= 0, got {beta}")
    if beta > 0 and kl is None:
        raise ValueError("beta > 0 needs kl (pass ref_velocity to transition_logprob)")
    log_ratio = log_prob - old_log_prob.detach().to(log_prob.dtype)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(ratio.dtype)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    if beta > 0:
        loss = loss + beta * kl.mean()
    with torch.no_grad():
        metrics = {
            "clip_ratio": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "approx_kl": 0.5 * log_ratio.square().mean(),
            "ratio": ratio.mean(),
        }
        if kl is not None:
            metrics["kl"] = kl.detach().mean()
    return loss, metrics
