"""Trainer state on disk without pickles: tensors in safetensors, everything else in JSON; written atomically.

A checkpoint folder holds the trained adapters as PEFT folders in the released layout (`llm_lora/` for the captioner,
`dit_lora/` for the decoder), `optimizer.safetensors` + `trainer_state.json` (each adapter's optimizer and LR
schedule, RNG, data position, step) and `config.yaml` (the run's config, so a resume with a different
one is refused).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, ConfigError
from ..io import atomic_dir
from .run_folder import CHECKPOINT_PREFIX, checkpoint_step
from .weights import load_trained

__all__ = [
    "save_checkpoint",
    "load_trainer_state",
    "prune_checkpoints",
    "check_same_config",
    "restore_optimizers",
    "restore_rng",
    "restore_adapters",
]

_STATE_FILE = "trainer_state.json"
_TENSORS_FILE = "optimizer.safetensors"
# Config keys a resumed run may change: where and how long it runs, how it logs; never what it learns.
RESUMABLE_CHANGES = frozenset(
    {"output_dir", "max_steps", "logging_steps", "save_steps", "save_total_limit", "report_images", "tensorboard",
     "device", "resume", "overwrite", "save_final_model", "distributed"}
)  # fmt: skip


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors (safetensors) and JSON (param groups, scalar state)."""
    tensors, scalars = {}, {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    folder: Path,
    *,
    adapters: dict,
    optimizers: dict,
    step: int,
    data_states: list[dict],
    rng_states: list[torch.Tensor],
    config: dict,
) -> Path:
    """Write one checkpoint folder atomically (a crash mid-write leaves the previous checkpoints untouched).

    Rank 0 writes it, from whole tensors every rank helped gather (see :mod:`uae_fast.train.weights`).

    Args:
        adapters: folder name of the released layout (`llm_lora`, `dit_lora`, ...) → (the trained object, its
            whole tensors for `save_pretrained(folder, state_dict=...)`).
        optimizers: name → (the optimizer's whole-tensor state dict, its LR scheduler).
        data_states, rng_states: each rank's data position and CPU RNG state, in rank order.
    """
    tensors, optimizer_meta = {}, {}
    for name, (optimizer_state, scheduler) in optimizers.items():
        flat, meta = _flatten_optimizer(optimizer_state)
        tensors.update({f"{name}/{key}": value for key, value in flat.items()})
        optimizer_meta[name] = {"optimizer": meta, "scheduler": scheduler.state_dict()}
    tensors["rng.cpu"] = rng_states[0]
    for rank, rng in enumerate(rng_states[1:], start=1):
        tensors[f"rng.cpu.rank{rank}"] = rng
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    state = {"step": step, "optimizers": optimizer_meta, "data": data_states[0], "data_ranks": data_states}
    with atomic_dir(folder) as tmp:
        for name, (trained, whole) in adapters.items():
            trained.save_pretrained(str(tmp / name), safe_serialization=True, state_dict=whole)
        save_file(tensors, tmp / _TENSORS_FILE)
        (tmp / _STATE_FILE).write_text(json.dumps(state, indent=1))
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def load_trainer_state(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(state JSON, tensors) of a checkpoint; the caller restores them into its objects."""
    for name in (_STATE_FILE, _TENSORS_FILE, "config.yaml"):
        if not (folder / name).exists():
            raise CheckpointError(f"{folder} is not a complete training checkpoint: {name} is missing")
    state = json.loads((folder / _STATE_FILE).read_text())
    return state, load_file(folder / _TENSORS_FILE)


def restore_adapters(folder: Path, adapters: dict, engine) -> None:
    """Load each `folder/<name>/` (as :func:`save_checkpoint` wrote it) into the object trained under `name`."""
    for name, trained in adapters.items():
        load_trained(trained, folder / name, engine)


def restore_optimizers(folder: Path, optimizers: dict, state: dict, tensors: dict[str, torch.Tensor], load) -> None:
    """Load each named (optimizer, scheduler) pair as :func:`save_checkpoint` wrote it; `load(optimizer, state)`
    takes each whole-tensor optimizer state (the engine's, which shards it as it shards the parameters)."""
    saved = state.get("optimizers")
    if saved is None:
        raise CheckpointError(f"{folder} was written by an older uae_fast (one unnamed optimizer): start a new run")
    for name, (optimizer, scheduler) in optimizers.items():
        if name not in saved:
            raise CheckpointError(f"{folder} holds no optimizer state for {name} (it has: {', '.join(sorted(saved))})")
        prefix = f"{name}/"
        flat = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        load(optimizer, _unflatten_optimizer(flat, saved[name]["optimizer"]))
        scheduler.load_state_dict(saved[name]["scheduler"])


def restore_rng(tensors: dict[str, torch.Tensor], rank: int = 0) -> None:
    """This rank's CPU RNG state (rank 0's when the checkpoint had fewer ranks) and the CUDA ones."""
    torch.set_rng_state(tensors.get(f"rng.cpu.rank{rank}", tensors["rng.cpu"]))  # rank 0's is "rng.cpu"
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def check_same_config(folder: Path, config: dict) -> None:
    """Refuse to resume a run whose learning-relevant settings differ from the checkpoint's."""
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    diffs = sorted(_diff(saved, config, "", ignore=RESUMABLE_CHANGES))
    if diffs:
        shown = "; ".join(diffs[:5]) + (f" (+{len(diffs) - 5} more)" if len(diffs) > 5 else "")
        raise ConfigError(f"cannot resume from {folder}: it was trained with a different config: {shown}")


def _diff(a, b, prefix: str, ignore=frozenset()) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if not prefix and key in ignore:
                continue
            out += _diff(a.get(key), b.get(key), f"{prefix}{key}.", ignore)
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} in the checkpoint, {b!r} now"]


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the `keep` most recent checkpoints."""
    found = [p for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*") if checkpoint_step(p) is not None]
    found.sort(key=checkpoint_step)
    for old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
