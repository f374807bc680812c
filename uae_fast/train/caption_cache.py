"""Caption → decoder conditioning, computed once per caption and reused across epochs (stage 1).

The frozen part of the conditioning (the LLM's hidden states, or the whole conditioning when nothing in it trains)
depends on the caption alone, so an epoch over a dataset needs each caption's LLM pass once per run rather than once
per step. Rows are kept on the CPU, unpadded; the least recently used are dropped beyond `size` captions.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from ..models.decoder import pad_and_stack

__all__ = ["ConditioningCache"]

# compute(captions) → (sequence [B, L, D], mask [B, L] bool, per-caption vector [B, P] or None), right-padded.
Compute = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


class ConditioningCache:
    """`cache(captions)` → (sequence [B, L, D], mask [B, L], vector [B, P] or None) on `device`.

    Args:
        compute: the (no-grad) function whose results are cached; called once per step on the missing captions.
        size: captions kept (0: no cache, every call computes).
        device: where the assembled batch goes.
    """

    def __init__(self, compute: Compute, *, size: int, device):
        self.compute = compute
        self.size = size
        self.device = device
        self.rows: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self.hits = self.misses = 0

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if not self.size:
            self.misses += len(captions)
            return self.compute(captions)
        missing = list(dict.fromkeys(c for c in captions if c not in self.rows))
        self.misses += len(missing)
        self.hits += len(captions) - len(missing)
        found = {}
        if missing:
            sequence, mask, vector = self.compute(missing)
            for i, caption in enumerate(missing):
                length = int(mask[i].sum())  # right-padded: the real tokens come first
                found[caption] = (sequence[i, :length].cpu(), None if vector is None else vector[i].cpu())
        rows = []
        for caption in captions:
            row = found.get(caption) or self.rows[caption]
            rows.append(row)
            self.rows[caption] = row
            self.rows.move_to_end(caption)
        while len(self.rows) > self.size:
            self.rows.popitem(last=False)
        sequence, mask = pad_and_stack(
            [r[0][None] for r in rows], [torch.ones(1, len(r[0]), dtype=torch.bool) for r in rows]
        )
        vector = None if rows[0][1] is None else torch.stack([r[1] for r in rows]).to(self.device)
        return sequence.to(self.device), mask.to(self.device), vector
