"""Reinforcement learning: rollout storage and packing, GRPO for the captioner (Flow-GRPO arrives with its issue).

Names load on first use: `uae_fast.rl.config` (the loss settings) is importable without torch.
"""

from __future__ import annotations

import importlib

_LAZY = {"MicroBatch": "rollout_buffer", "PackedBatches": "rollout_buffer", "RolloutBuffer": "rollout_buffer",
         "pack_sequences": "rollout_buffer"}  # fmt: skip
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
