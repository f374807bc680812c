"""The processes of a run: who this rank is, the process group, and the few reductions the stages need.

A run is distributed when a launcher started it: `torchrun` and the `deepspeed` launcher both set `RANK`,
`WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`. Without them the run is one process and every
reduction here is the identity, so the stages call them unconditionally.

Every collective waits at most `distributed.timeout_s`: a rank that died or hangs makes the others fail with an
error naming this rank, instead of a silent hang (the launcher then stops the job; `--resume` continues it from the
last checkpoint).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from ..errors import ConfigError

__all__ = ["Runtime", "start", "current"]


@dataclass(frozen=True)
class Runtime:
    """This process's place in the run (rank 0 of 1 when not launched by torchrun or deepspeed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes logs, reports and checkpoints."""
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (float64, one collective for all of them)."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        torch.distributed.all_reduce(t)
        return t.tolist()

    def max(self, value: int) -> int:
        if not self.distributed:
            return int(value)
        t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t)

    def gather(self, obj) -> list:
        """`obj` of every rank, in rank order (any picklable value)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def on_main(self, work):
        """`work()` on rank 0; its result (or its error, raised again) on every rank."""
        outcome = None
        if self.is_main:
            try:
                outcome = ("ok", work())
            except Exception as exc:  # every rank must learn of it, or the others wait for rank 0 forever
                outcome = ("error", exc)
        kind, value = self.broadcast(outcome)
        if kind == "error":
            raise value
        return value


_current = Runtime()


def current() -> Runtime:
    """The runtime :func:`start` set up (one process until then)."""
    return _current


def start(*, timeout_s: float, device: str | None = None) -> Runtime:
    """Join the launcher's process group (once per process) and return this rank's :class:`Runtime`.

    NCCL on CUDA (each rank on `cuda:LOCAL_RANK`), gloo on a CPU. A one-process run needs no process group.

    Raises:
        ConfigError: the launcher's environment is incomplete or inconsistent.
    """
    global _current
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _current = Runtime()
        return _current
    try:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    except (KeyError, ValueError):
        raise ConfigError("WORLD_SIZE is set but RANK is not: start distributed runs with torchrun or deepspeed")
    if not torch.distributed.is_initialized():
        cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        if cuda:
            torch.cuda.set_device(local)
        torch.distributed.init_process_group(
            "nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
        )
    _current = Runtime(rank=rank, world_size=world, local_rank=local)
    return _current


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
