"""Reinforcement learning: rollout storage and packing, GRPO for the captioner (Flow-GRPO arrives with its issue)."""

from uae_fast.rl.rollout_buffer import MicroBatch, PackedBatches, RolloutBuffer, pack_sequences

__all__ = ["MicroBatch", "PackedBatches", "RolloutBuffer", "pack_sequences"]
