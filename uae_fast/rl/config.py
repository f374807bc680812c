"""Settings of the captioner's GRPO loss, importable without torch (a config is validated before the heavy
imports). Names and meanings follow TRL's `GRPOConfig` where the concept is the same."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import check_all

__all__ = ["LOSS_TYPES", "IS_LEVELS", "SCALE_REWARDS", "GRPOLossConfig"]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IS_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class GRPOLossConfig:
    """Loss settings of the GRPO update (TRL names)."""

    beta: float = field(default=0.0, metadata={"help": "KL coefficient (k3 estimator); 0 skips the reference pass"})
    epsilon: float = field(default=0.2, metadata={"help": "lower clipping bound: ratio >= 1 - epsilon"})
    epsilon_high: float | None = field(
        default=None, metadata={"help": "upper bound 1 + epsilon_high (default epsilon)"}
    )
    loss_type: str = field(default="dapo", metadata={"help": f"normalisation, one of {LOSS_TYPES}"})
    importance_sampling_level: str = field(default="token", metadata={"help": f"one of {IS_LEVELS}"})
    scale_rewards: str = field(default="group", metadata={"help": f"advantage scaling, one of {SCALE_REWARDS}"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature, divides the logits"})
    max_completion_length: int = field(default=512, metadata={"help": "tokens per caption (dr_grpo normaliser)"})
    chunk_size: int = field(default=1024, metadata={"help": "tokens per chunk of the fused LM head"})
    vocab_block: int | None = field(
        default=8192, metadata={"help": "vocabulary entries per block (None = all at once: more memory)"}
    )
    compute_entropy: bool = field(default=True, metadata={"help": "compute the mean entropy metric"})
    entropy_coef: float = field(
        default=0.0, metadata={"help": "entropy bonus: each token's advantage gets -c (log p(y) + H); 0 = off"}
    )

    def __post_init__(self):
        checks = [
            (self.loss_type in LOSS_TYPES, f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}"),
            (
                self.importance_sampling_level in IS_LEVELS,
                f"importance_sampling_level must be one of {IS_LEVELS}, got {self.importance_sampling_level!r}",
            ),
            (
                self.scale_rewards in SCALE_REWARDS,
                f"scale_rewards must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}",
            ),
            (self.beta >= 0, f"beta must be >= 0, got {self.beta}"),
            (self.entropy_coef >= 0, f"entropy_coef must be >= 0, got {self.entropy_coef}"),
            (0 <= self.epsilon < 1, f"epsilon must be in [0, 1), got {self.epsilon}"),
            (
                self.epsilon_high is None or self.epsilon_high >= 0,
                f"epsilon_high must be >= 0, got {self.epsilon_high}",
            ),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (self.max_completion_length >= 1, f"max_completion_length must be >= 1, got {self.max_completion_length}"),
            (self.chunk_size >= 1, f"chunk_size must be >= 1, got {self.chunk_size}"),
            (self.vocab_block is None or self.vocab_block >= 1, f"vocab_block must be >= 1, got {self.vocab_block}"),
        ]
        check_all(checks)


# Stage 2b (Flow-GRPO on the decoder): the Gaussian transitions `uae_fast.rl.flow_grpo` can make of an Euler step.
SDE_TYPES = ("sde", "cps")
__all__ += ["SDE_TYPES"]
