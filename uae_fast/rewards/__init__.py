"""Reconstruction reward: feature extractors (CLIP, DINOv2, DINOv3, LongCLIP), on-device preprocessing, the fused
weighted-cosine reward and its source-feature cache.

Imported lazily by the CLI: this package pulls in torch and transformers.
"""

from uae_fast.rewards.backbones import BACKBONE_LOADERS, BACKBONE_NAMES, FeatureExtractor, load_backbone, load_backbones
from uae_fast.rewards.preprocess import TensorPreprocess, as_image_batch
from uae_fast.rewards.reconstruction import (
    REWARD_FUNCTIONS,
    ReconstructionReward,
    RewardConfig,
    RewardOutput,
    register_reward,
)
from uae_fast.rewards.tiny import save_tiny_backbones, tiny_backbone_paths

__all__ = [
    "BACKBONE_LOADERS",
    "BACKBONE_NAMES",
    "FeatureExtractor",
    "REWARD_FUNCTIONS",
    "ReconstructionReward",
    "RewardConfig",
    "RewardOutput",
    "TensorPreprocess",
    "as_image_batch",
    "load_backbone",
    "load_backbones",
    "register_reward",
    "save_tiny_backbones",
    "tiny_backbone_paths",
]
