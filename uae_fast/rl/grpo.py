"""GRPO for the captioner: group advantages, the loss configuration, and the loss over packed completions.

The heavy lifting (log-probs and loss fused with the LM head, never materialising [tokens, vocab] logits) is in
`uae_fast.kernels.grpo_loss`; this module holds what a trainer calls. Field names and semantics follow TRL's
`GRPOConfig` where the concept is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..kernels.grpo_loss import fused_linear_grpo_loss
from ..kernels.linear_logprobs import linear_logprobs
from .config import SCALE_REWARDS, GRPOLossConfig

__all__ = [
    "SCALE_REWARDS",
    "GRPOLossConfig",
    "GroupAdvantages",
    "PackedCompletions",
    "group_advantages",
    "grpo_loss",
    "completion_logprobs",
]

ADVANTAGE_EPS = 1e-4  # TRL's: keeps (r - mean) / (std + eps) finite for a near-tied group, never 0 / 0
# A group whose std is at most this many fp32 ulps of its largest |reward| is tied: advantages exactly 0. Reward
# functions combine a few weighted fp32 terms, each rounding by half an ulp, so the same score reached along two
# paths can differ by a few ulps (0.1 + 0.2 != 0.3); that is rounding, not signal, yet divided by std + 1e-4 it would
# still push the whole group (and the zero-advantage skip would never fire). 8 ulps ~ 1e-6 relative: far below any
# reward resolution that means something, far above what the rounding of a handful of terms can produce.
TIE_ULPS = 8


@dataclass
class GroupAdvantages:
    advantages: torch.Tensor  # [N], 0 for invalid rewards and all-equal groups
    group_std: torch.Tensor  # [num_groups] within-group std of the valid rewards (0 when fewer than two, or tied)
    num_zero_std_groups: int  # groups whose valid rewards are all equal (no learning signal)
    num_invalid_rewards: int  # NaN / inf rewards (failed or unscored samples), left out of the statistics

    @property
    def frac_reward_zero_std(self) -> float:
        return self.num_zero_std_groups / max(self.group_std.numel(), 1)


def group_advantages(
    rewards: torch.Tensor,
    num_generations: int | None = None,
    scale_rewards: str = "group",
    eps: float = ADVANTAGE_EPS,
    *,
    group_ids: torch.Tensor | None = None,
) -> GroupAdvantages:
    """A_i = (r_i - mean_g) / (std_g + eps), TRL's formula (Bessel-corrected std), robust to bad rewards.

    Groups are either consecutive runs of `num_generations` (image-major rollouts: group b is
    rewards[b*G:(b+1)*G]) or given by `group_ids` [N] (any layout, any sizes). NaN or inf rewards are left out of
    the mean and std and get advantage 0; so do all-equal groups — exactly 0.0, also when the rewards differ by
    rounding only (std within `TIE_ULPS` fp32 ulps of the largest |reward|) — counted in `num_zero_std_groups`.
    `scale_rewards`: "group" divides by the group's std, "batch" by the std of all valid rewards, "none" only centres.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ConfigError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if group_ids is None:
        if num_generations is None or num_generations < 1 or rewards.dim() != 1 or rewards.numel() % num_generations:
            raise ConfigError(
                f"rewards must be [B*G] with G = num_generations = {num_generations}, got shape {tuple(rewards.shape)}"
            )
        group_ids = torch.arange(rewards.numel() // num_generations).repeat_interleave(num_generations)
    elif group_ids.shape != rewards.shape or rewards.dim() != 1:
        raise ConfigError(
            f"group_ids must be [N] like rewards, got {tuple(group_ids.shape)} and {tuple(rewards.shape)}"
        )
    groups, index = torch.unique(group_ids.to(rewards.device), return_inverse=True)
    r = rewards.float()
    valid = torch.isfinite(r)

    def per_group(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(groups.numel(), device=r.device).index_add_(0, index, x)

    def group_max(x: torch.Tensor) -> torch.Tensor:  # 0 for a group without valid rewards
        out = torch.full((groups.numel(),), float("-inf"), device=r.device).scatter_reduce_(0, index, x, "amax")
        return torch.where(torch.isfinite(out), out, 0.0)

    count = per_group(valid.float())
    # Shifted data: statistics of r - pivot, the pivot being one of the group's own rewards (its largest). Summing
    # 0.3 eight times in fp32 gives a mean an ulp off, hence r - mean = ±3e-8 and advantages of ±3e-4 for a tied
    # group; shifted, a tied group sums exact zeros and its r - mean is 0.0. It also spares a large common offset
    # (rewards near 1000) from cancelling the spread.
    pivot = group_max(torch.where(valid, r, float("-inf")))
    shifted = torch.where(valid, r - pivot[index], 0.0)
    centred = torch.where(valid, shifted - (per_group(shifted) / count.clamp(min=1))[index], 0.0)
    var = per_group(centred**2) / (count - 1).clamp(min=1)
    std = torch.where(count > 1, var.sqrt(), 0.0)
    tied = std <= TIE_ULPS * torch.finfo(torch.float32).eps * group_max(torch.where(valid, r.abs(), 0.0))
    group_std = torch.where(tied, 0.0, std)
    centred = torch.where(tied[index], 0.0, centred)
    if scale_rewards == "group":
        adv = centred / (group_std[index] + eps)
    elif scale_rewards == "batch":
        flat = r[valid]
        adv = centred / ((flat.std() if flat.numel() > 1 else flat.new_zeros(())) + eps)
    else:
        adv = centred
    return GroupAdvantages(
        advantages=adv,
        group_std=group_std,
        num_zero_std_groups=int(tied.sum()),
        num_invalid_rewards=int((~valid).sum()),
    )


@dataclass
class PackedCompletions:
    """Completion tokens of S sequences, packed without padding."""

    token_ids: torch.Tensor  # [N] sampled tokens
    seq_index: torch.Tensor  # [N] sequence of each token, in [0, S)
    num_sequences: int  # S, including sequences with no tokens
    mask: torch.Tensor | None = None  # [N] 1 = counts in the loss
    old_logp: torch.Tensor | None = None  # [N] behaviour policy (None = on-policy, num_iterations == 1)
    ref_logp: torch.Tensor | None = None  # [N] reference policy (needed when beta > 0)

    @classmethod
    def from_padded(cls, ids: torch.Tensor, mask: torch.Tensor, **per_token) -> PackedCompletions:
        """From right-padded [S, T] ids and mask (per_token tensors [S, T] are packed the same way)."""
        keep = mask.bool()
        seq_index = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)[keep]
        packed = {k: (v[keep] if v is not None else None) for k, v in per_token.items()}
        return cls(token_ids=ids[keep], seq_index=seq_index, num_sequences=ids.shape[0], **packed)


def grpo_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    batch: PackedCompletions,
    advantages: torch.Tensor,
    config: GRPOLossConfig,
    num_items: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Loss, per-token log-probs [N] (detached) and metrics for hidden states [N, H] of `batch`'s tokens."""
    return fused_linear_grpo_loss(
        hidden,
        lm_head_weight,
        batch.token_ids,
        batch.seq_index,
        advantages,
        mask=batch.mask,
        old_logp=batch.old_logp,
        ref_logp=batch.ref_logp,
        num_sequences=batch.num_sequences,
        beta=config.beta,
        epsilon_low=config.epsilon,
        epsilon_high=config.epsilon_high,
        loss_type=config.loss_type,
        importance_sampling_level=config.importance_sampling_level,
        temperature=config.temperature,
        max_completion_length=config.max_completion_length,
        num_items=num_items,
        chunk_size=config.chunk_size,
        vocab_block=config.vocab_block,
        compute_entropy=config.compute_entropy,
        entropy_coef=config.entropy_coef,
    )


@torch.no_grad()
def completion_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    token_ids: torch.Tensor,
    config: GRPOLossConfig,
    *,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """No-grad per-token log-probs [N] for the old-policy and reference passes: one GEMM per block.

    `entropy=True` also returns the per-token entropy [N] (else None). Off by default: the trainer logs the
    current policy's entropy from `grpo_loss`, and here it would cost another pass over every logits block.
    """
    return linear_logprobs(
        hidden,
        lm_head_weight,
        token_ids,
        temperature=config.temperature,
        chunk_size=config.chunk_size,
        vocab_block=config.vocab_block,
        entropy=entropy,
    )
