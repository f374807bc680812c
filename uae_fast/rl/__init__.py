"""Reinforcement-learning data structures and losses."""

from uae_fast.rl.rollout_buffer import MicroBatch, PackedBatches, RolloutBuffer, pack_sequences

__all__ = ["MicroBatch", "PackedBatches", "RolloutBuffer", "pack_sequences"]
