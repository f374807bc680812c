"""Trained weights that are not PEFT adapters, checkpointed beside them: a fully fine-tuned module (stage 1's DiT,
the projector) and the exponential moving average of trained parameters.

Both follow the adapters' checkpoint protocol: `save_pretrained(folder)` writes `model.safetensors` there and
`load_saved(folder)` reads it back (see :func:`uae_fast.train.state.restore_adapters`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

__all__ = ["EMA", "FullWeights"]

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
    if set(tensors) != set(expected) or any(tensors[k].shape != v.shape for k, v in expected.items()):
        raise CheckpointError(f"{path} does not fit this model (different parameter names or shapes)")
    return tensors


class FullWeights:
    """Every weight of `module`, trained without adapters."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def save_pretrained(self, folder, safe_serialization: bool = True) -> None:
        _save(self.module.state_dict(), folder)

    def load_saved(self, folder) -> None:
        self.module.load_state_dict(_load(folder, self.module.state_dict()))


class EMA:
    """Exponential moving average (in fp32) of named parameters: after each optimizer step
    `shadow ← decay·shadow + (1 − decay)·param`."""

    def __init__(self, parameters: dict[str, torch.nn.Parameter], decay: float):
        self.parameters = parameters
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in parameters.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.parameters.items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self):
        """Context in which the parameters hold the averaged values (to evaluate or save them); restored after."""
        saved = {name: p.detach().clone() for name, p in self.parameters.items()}
        with torch.no_grad():
            for name, p in self.parameters.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.parameters.items():
                    p.copy_(saved[name])

    def save_pretrained(self, folder, safe_serialization: bool = True) -> None:
        _save(self.shadow, folder)

    def load_saved(self, folder) -> None:
        tensors = _load(folder, self.shadow)
        self.shadow = {k: v.to(self.shadow[k].device) for k, v in tensors.items()}
