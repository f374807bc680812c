"""Scale-out: the processes of a run (:mod:`.runtime`) and the engines that share the trained weights between them
(:mod:`.engines`: `ddp`, `fsdp2`; :mod:`.zero`: DeepSpeed ZeRO-2)."""

from .engines import ENGINES, Engine, make_engine
from .runtime import Runtime, current, start

__all__ = ["ENGINES", "Engine", "Runtime", "current", "make_engine", "start"]
