"""Pieces every stage's loop uses: the learning-rate schedule and the per-phase wall-clock timer."""

from __future__ import annotations

import contextlib
import math
import time
import warnings

import torch

__all__ = ["lr_factor", "make_scheduler", "skip_updates", "PhaseTimer"]


def lr_factor(update: int, *, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the base learning rate at optimizer update `update` (0-based) of `total`.

    Linear warmup over `warmup` updates (from 1/(warmup+1), never 0), then constant, linear decay to 0 or a
    half cosine to 0 at `total`.
    """
    if update < warmup:
        return (update + 1) / (warmup + 1)
    progress = min((update - warmup) / max(total - warmup, 1), 1.0)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def make_scheduler(optimizer: torch.optim.Optimizer, *, warmup: int, total: int, kind: str):
    """A LambdaLR over :func:`lr_factor`. Step it once per *planned* update, also when an update is skipped (no
    learning signal), so the schedule ends at `total` whatever the data did."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda update: lr_factor(update, warmup=warmup, total=total, kind=kind)
    )


def skip_updates(scheduler, count: int = 1) -> None:
    """Advance the schedule over `count` planned updates that had no learning signal (no optimizer step)."""
    with warnings.catch_warnings():  # torch warns of a scheduler step without an optimizer step: intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(count):
            scheduler.step()


class PhaseTimer:
    """Wall time per named phase of a step; CUDA is synchronised at the edges so asynchronous kernels are charged to
    the phase that launched them."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start
