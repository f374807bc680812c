"""Reward settings, importable without torch: a config is checked (and a wrong one refused) in a fraction of a
second, before the heavy libraries load."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ConfigError

__all__ = ["BACKBONE_NAMES", "DINO_FEATURE_NAMES", "BUILTIN_REWARDS", "REWARD_FUNCTIONS", "RewardConfig"]

BACKBONE_NAMES = ("clip", "dinov2", "dinov3", "longclip")
DINO_FEATURE_NAMES = ("cls", "mean_patch")
# Registered by uae_fast.rewards.reconstruction when it loads (they run on tensors).
BUILTIN_REWARDS = ("weighted_cosine",)
# name → fn(src_feats [S, D], rec_feats [N, D], index [N], offsets [K+1], weights [K], failed [N] | None, **kw)
#        → (rewards [N], per-backbone cos [N, K], valid [N])
REWARD_FUNCTIONS: dict[str, Callable] = {}


@dataclass
class RewardConfig:
    """Reward settings: which backbones, with which weights, from which local folders."""

    weights: dict[str, float] = field(
        default_factory=lambda: {name: 0.25 for name in BACKBONE_NAMES},
        metadata={"help": "backbone name → weight w_k; the reward is Σ_k w_k·cos_k (0.25 each = Unified-Bench/100)"},
    )
    backbones: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "backbone name → local folder (or 'tiny'); every weighted backbone needs one"},
    )
    function: str = field(default="weighted_cosine", metadata={"help": "name in REWARD_FUNCTIONS"})
    cache_size: int = field(default=4096, metadata={"help": "source images whose features stay cached (LRU)"})
    fill_value: float = field(default=0.0, metadata={"help": "reward given to invalid (NaN/inf/failed) samples"})
    dino_feature: str = field(
        default="cls", metadata={"help": "DINOv2/v3 feature: 'cls' (Unified-Bench's) or 'mean_patch' (patch mean)"}
    )
    micro_batch: int | None = field(
        default=None, metadata={"help": "images per backbone forward (default: 64 on CUDA, 8 on CPU); bounds memory"}
    )

    def __post_init__(self):
        if not self.weights:
            raise ConfigError("reward.weights is empty: give at least one backbone, e.g. {'clip': 1.0}")
        for name, w in self.weights.items():
            if name not in BACKBONE_NAMES:
                raise ConfigError(f"reward.weights: unknown backbone {name!r}; choose from {', '.join(BACKBONE_NAMES)}")
            if not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ConfigError(f"reward.weights[{name!r}] must be a finite number, got {w!r}")
        if all(w == 0 for w in self.weights.values()):
            raise ConfigError("reward.weights are all 0: the reward would be constant")
        missing = [n for n in self.weights if n not in self.backbones]
        if missing:
            raise ConfigError(
                f"reward.backbones has no path for {', '.join(missing)}: map each to a local folder or 'tiny'"
            )
        if self.function not in REWARD_FUNCTIONS and self.function not in BUILTIN_REWARDS:
            known = ", ".join(sorted(set(REWARD_FUNCTIONS) | set(BUILTIN_REWARDS)))
            raise ConfigError(f"reward.function {self.function!r} unknown; choose from {known}")
        if self.cache_size < 0:
            raise ConfigError(f"reward.cache_size must be >= 0, got {self.cache_size}")
        if self.dino_feature not in DINO_FEATURE_NAMES:
            raise ConfigError(
                f"reward.dino_feature must be one of {', '.join(DINO_FEATURE_NAMES)}, got {self.dino_feature!r}"
            )
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ConfigError(f"reward.micro_batch must be >= 1, got {self.micro_batch}")
        if not math.isfinite(self.fill_value):
            raise ConfigError("reward.fill_value must be finite: it is what invalid samples feed the optimiser")
