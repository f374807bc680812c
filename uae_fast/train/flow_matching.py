"""SD3's rectified-flow training objective (stage 1): timestep densities, loss weights and the loss.

x_σ = (1 − σ)·x₀ + σ·ε, the DiT predicts the velocity v = ε − x₀. u is drawn from the weighting scheme's density
on (0, 1) as in the SD3 paper (u is the noise level: a positive `logit_mean` means noisier), then shifted as the
scheduler shifts: σ = s·u / (1 + (s − 1)·u). diffusers' SD3 scripts draw u the same way but look σ up at index
⌊1000·u⌋ of their descending schedule, which mirrors u (their `logit_mean` m is our −m; the same for the default 0).
The squared error is weighted per sample as in their `compute_loss_weighting_for_sd3`.
"""

from __future__ import annotations

import math

import torch

__all__ = ["sample_sigmas", "loss_weights", "noisy_latents", "flow_matching_loss"]


def sample_sigmas(
    count: int,
    *,
    scheme: str,
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[count] noise levels σ in (0, 1), fp32 on the CPU.

    `logit_normal`: u = sigmoid(N(logit_mean, logit_std²)) (SD3's choice); `mode`: SD3's mode density with
    `mode_scale`; `cosmap`: u = 1 − 1 / (tan(π·v/2) + 1); `uniform` and `sigma_sqrt`: u uniform.
    """
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.randn(count, generator=generator) * logit_std + logit_mean)
    else:
        u = torch.rand(count, generator=generator)
        if scheme == "mode":
            u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        elif scheme == "cosmap":
            u = 1 - 1 / (torch.tan(math.pi * u / 2) + 1)
    u = u.clamp(1e-5, 1 - 1e-5)  # σ = 0 or 1 makes the sigma_sqrt weight or the velocity target degenerate
    return shift * u / (1 + (shift - 1) * u)


def loss_weights(sigmas: torch.Tensor, scheme: str) -> torch.Tensor:
    """Per-sample weights: 1/σ² (`sigma_sqrt`), 2 / (π(1 − 2σ + 2σ²)) (`cosmap`), else 1 (SD3 with logit_normal)."""
    if scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2))
    return torch.ones_like(sigmas, dtype=torch.float32)


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x₀ + σ·ε for a [B] vector of σ."""
    s = sigmas.to(latents.device, torch.float32).view(-1, *([1] * (latents.dim() - 1)))
    return ((1 - s) * latents.float() + s * noise.float()).to(latents.dtype)


def flow_matching_loss(
    prediction: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Per sample: weight × the mean squared error of the predicted velocity against ε − x₀, in fp32.

    Args:
        prediction, latents, noise: [B, C, h, w]; weights: [B].
    Returns:
        [B] per-sample losses (the caller takes the mean: a per-sample vector also serves evaluation).
    """
    target = noise.float() - latents.float()
    error = (prediction.float() - target).pow(2).flatten(1).mean(1)
    return weights.to(error.device) * error
