"""Reconstruction reward: feature extractors (CLIP, DINOv2, DINOv3, LongCLIP), on-device preprocessing, the fused
weighted-cosine reward and its source-feature cache.

Names load on first use: most of this package pulls in torch and transformers, but `RewardConfig`
(`uae_fast.rewards.config`) does not, so a config is validated before the heavy imports.
"""

from __future__ import annotations

from uae_fast.lazy import lazy_exports

_LAZY = {
    "BACKBONE_LOADERS": "backbones",
    "BACKBONE_NAMES": "config",
    "FeatureExtractor": "backbones",
    "REWARD_FUNCTIONS": "reconstruction",
    "ReconstructionReward": "reconstruction",
    "RewardConfig": "config",
    "RewardOutput": "reconstruction",
    "TensorPreprocess": "preprocess",
    "as_image_batch": "preprocess",
    "load_backbone": "backbones",
    "load_backbones": "backbones",
    "register_reward": "reconstruction",
    "save_tiny_backbones": "tiny",
    "tiny_backbone_paths": "tiny",
}
__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
