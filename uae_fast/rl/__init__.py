"""Reinforcement learning: rollout storage and packing, GRPO for the captioner, Flow-GRPO for the decoder.

Names load on first use: `uae_fast.rl.config` (the loss settings) is importable without torch.
"""

from __future__ import annotations

from uae_fast.lazy import lazy_exports

_LAZY = {"MicroBatch": "rollout_buffer", "PackedBatches": "rollout_buffer", "RolloutBuffer": "rollout_buffer",
         "pack_sequences": "rollout_buffer", "SDEStep": "flow_grpo", "sde_step": "flow_grpo",
         "transition_logprob": "flow_grpo", "flow_grpo_loss": "flow_grpo"}  # fmt: skip
__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
