"""Training: `uae_fast.train(config)` runs a stage: `G4UTrainer` is stage 2a ("generation for understanding", GRPO on
the captioner), `U4GTrainer` stage 2b ("understanding for generation", Flow-GRPO on the decoder) and
`UnifiedTrainer` the Unified-GRPO schedule of both; `PretrainTrainer` is stage 1 (rectified-flow pretraining of the
decoder on long captions) and `ColdStartTrainer` the cold start (differentiable reconstruction).

`uae_fast.train` is both this package and a function: the module is callable, so `uae_fast.train(config)` and
`from uae_fast.train import G4UTrainer` both work. Names load on first use so `uae-fast --help` stays instant.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

from ..lazy import lazy_exports

__all__ = [
    "ColdStartTrainer",
    "PretrainTrainer",
    "DataConfig",
    "DecoderConfig",
    "G4UTrainer",
    "LoraSettings",
    "TrainConfig",
    "U4GTrainer",
    "UnifiedTrainer",
    "load_train_config",
    "shipped_configs",
    "train",
]

_LAZY = {
    "DataConfig": "config",
    "DecoderConfig": "config",
    "LoraSettings": "config",
    "TrainConfig": "config",
    "load_train_config": "config",
    "shipped_configs": "config",
    "G4UTrainer": "g4u",
    "PretrainTrainer": "pretrain",
    "ColdStartTrainer": "cold_start",
    "U4GTrainer": "u4g",
    "UnifiedTrainer": "unified",
}


def train(config=None, overrides: list[str] | tuple = ()) -> Path:
    """Run training; `config` is a TrainConfig, a dict, a YAML path or a shipped config name. Returns the run dir."""
    from ..dist import start
    from .config import TrainConfig, load_train_config
    from .run_folder import prepare_run_folder

    if not isinstance(config, TrainConfig):
        config = load_train_config(config, overrides)
    elif overrides:
        config = load_train_config(config.to_dict(), overrides)
    # A torchrun / deepspeed launch: join the other ranks (one process otherwise).
    runtime = start(timeout_s=config.distributed.timeout_s, device=config.device)
    # Refuse a wrong run folder before the models load (seconds to minutes), not after.
    runtime.on_main(
        lambda: prepare_run_folder(config.output_dir, resume=config.resume, overwrite=config.overwrite, check_only=True)
    )
    try:
        return _trainer_class(config.stage)(config).train()
    except RuntimeError as exc:
        if runtime.distributed and _lost_contact(exc):
            from ..errors import DistributedError

            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise DistributedError(
                f"rank {runtime.rank} of {runtime.world_size} lost contact with the other ranks (one died, or hangs "
                f"past distributed.timeout_s={config.distributed.timeout_s:g}): {first}; continue the run with "
                "--resume"
            ) from None
        raise


def _lost_contact(exc: BaseException) -> bool:
    """A collective failed because a peer is gone or silent (gloo / NCCL wording), not a bug in this rank."""
    text = str(exc).lower()
    return any(w in text for w in ("timed out", "timeout", "connection reset", "connection closed", "broken pipe",
                                   "socket", "nccl", "gloo", "peer"))  # fmt: skip


def _trainer_class(stage: str):
    if stage == "g4u":
        from .g4u import G4UTrainer as trainer
    elif stage == "u4g":
        from .u4g import U4GTrainer as trainer
    elif stage == "pretrain":
        from .pretrain import PretrainTrainer as trainer
    elif stage == "cold_start":
        from .cold_start import ColdStartTrainer as trainer
    else:
        from .unified import UnifiedTrainer as trainer
    return trainer


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
