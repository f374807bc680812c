"""What a stage trains, as checkpoints see it: PEFT adapters, a fully fine-tuned module (stage 1's DiT, the
projector) and the exponential moving average of trained parameters.

All follow one protocol, so that a checkpoint is written from sharded weights by rank 0 alone:
:func:`trained_state` gives the tensors to save (every rank calls it; the engine makes them whole), then
`save_pretrained(folder, state_dict=whole)` writes them (PEFT's own method for adapters, `model.safetensors` for
the others), and :func:`load_trained` reads them back into the (possibly sharded) parameters through the engine.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

__all__ = ["EMA", "FullWeights", "adapter_parameters", "load_trained", "trained_state"]

_FILE = "model.safetensors"


def _save(tensors: dict[str, torch.Tensor], folder) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, folder / _FILE)


def _load(folder, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    path = Path(folder) / _FILE
    if not path.is_file():
        raise CheckpointError(f"{Path(folder).parent} is not a complete training checkpoint: {path.name} is missing")
    tensors = load_file(path)
    # (a ZeRO-3 parameter's own shape is its empty partition's: `ds_shape` is the whole one)
    if set(tensors) != set(expected) or any(
        tensors[k].shape != getattr(v, "ds_shape", v.shape) for k, v in expected.items()
    ):
        raise CheckpointError(f"{path} does not fit this model (different parameter names or shapes)")
    return tensors


def adapter_parameters(peft_model) -> dict[str, torch.nn.Parameter]:
    """A PEFT model's trained parameters under the names its adapter folder stores them."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model, state_dict=peft_model.state_dict(keep_vars=True))


def trained_state(trained) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint keeps of `trained` (a PEFT model, :class:`FullWeights` or :class:`EMA`), under the
    names its `save_pretrained(folder, state_dict=...)` takes; possibly sharded (see the module docstring)."""
    if hasattr(trained, "trained_state"):
        return trained.trained_state()
    ids = {id(p) for p in adapter_parameters(trained).values()}
    return {k: v for k, v in trained.state_dict(keep_vars=True).items() if id(v) in ids}


def load_trained(trained, folder, engine) -> None:
    """Load what `save_pretrained` wrote in `folder` into `trained`, each tensor through `engine.load`.

    Raises:
        CheckpointError: the folder is missing or holds other parameters than `trained` has.
    """
    if hasattr(trained, "load_saved"):
        trained.load_saved(folder, engine)
        return
    from peft.utils import load_peft_weights

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder.parent} is not a complete training checkpoint: {folder.name} is missing")
    params = adapter_parameters(trained)
    weights = load_peft_weights(str(folder), device="cpu")
    unexpected = sorted(set(weights) - set(params))
    missing = sorted(set(params) - set(weights))
    if unexpected or missing:
        first = f"unexpected key {unexpected[0]}" if unexpected else f"missing key {missing[0]}"
        raise CheckpointError(f"{folder} does not fit this model ({first})")
    for name, param in params.items():
        engine.load(param, weights[name])


class FullWeights:
    """Every weight of `module`, trained without adapters."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def trained_state(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict(keep_vars=True)  # the parameters themselves: the engine gathers them

    def save_pretrained(self, folder, safe_serialization: bool = True, state_dict=None) -> None:
        _save(self.module.state_dict() if state_dict is None else state_dict, folder)

    def load_saved(self, folder, engine) -> None:
        tensors = _load(folder, self.module.state_dict(keep_vars=True))
        for name, tensor in self.module.state_dict(keep_vars=True).items():
            engine.load(tensor, tensors[name])


class EMA:
    """Exponential moving average (in fp32) of named parameters: after each optimizer step
    `shadow ← decay·shadow + (1 − decay)·param`, kept over the part of each parameter this rank holds
    (`engine.local`: the whole tensor, an FSDP2 shard, a ZeRO-3 partition)."""

    def __init__(self, parameters: dict[str, torch.nn.Parameter], decay: float, engine):
        self.parameters = parameters
        self.decay = decay
        self.engine = engine
        self.shadow = {name: engine.local(p).detach().float().clone() for name, p in parameters.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.parameters.items():
            self.shadow[name].lerp_(self.engine.local(p).detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self):
        """Context in which the parameters hold the averaged values (to evaluate or save them); restored after.
        Every rank enters it."""
        saved = {name: self.engine.local(p).detach().clone() for name, p in self.parameters.items()}
        for name, p in self.parameters.items():
            self.engine.compute_with(p, self.shadow[name])
        try:
            yield
        finally:
            for name, p in self.parameters.items():
                self.engine.compute_with(p, saved[name])

    def trained_state(self) -> dict[str, torch.Tensor]:
        return {name: self.engine.full_local(p, self.shadow[name]) for name, p in self.parameters.items()}

    def save_pretrained(self, folder, safe_serialization: bool = True, state_dict=None) -> None:
        _save(self.trained_state() if state_dict is None else state_dict, folder)

    def load_saved(self, folder, engine) -> None:
        tensors = _load(folder, self.parameters)
        for name, p in self.parameters.items():
            engine.load_local(p, self.shadow[name], tensors[name])
