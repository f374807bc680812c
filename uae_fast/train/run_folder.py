"""The run folder: one run per folder, never two mixed.

A folder that already holds a run (its config, metrics, checkpoints, final model or report) is only reused when
asked: `resume` continues that run from its latest checkpoint, `overwrite` deletes the run's files first. Anything
else is refused with one line that says which of the two to pass.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from ..io import ensure_output_dir

__all__ = [
    "CHECKPOINT_PREFIX",
    "RUN_FILES",
    "checkpoint_step",
    "latest_checkpoint",
    "run_files_in",
    "prepare_run_folder",
]

CHECKPOINT_PREFIX = "checkpoint-"

# What a training run writes into its folder (checkpoints are `checkpoint-<step>/`).
RUN_FILES = ("config.yaml", "metrics.jsonl", "tensorboard", "final", "report", "skipped.json")


def checkpoint_step(path: Path) -> int | None:
    """The step of a `checkpoint-<step>` folder, None for any other name."""
    tail = path.name[len(CHECKPOINT_PREFIX) :] if path.name.startswith(CHECKPOINT_PREFIX) else ""
    return int(tail) if tail.isdigit() else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint of the highest step in a run folder, or None."""
    found = [p for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and checkpoint_step(p) is not None]
    return max(found, key=checkpoint_step) if found else None


def run_files_in(folder: Path) -> list[Path]:
    """The run files and checkpoint folders present in `folder`, in a stable order."""
    found = [folder / name for name in RUN_FILES if (folder / name).exists()]
    return found + sorted(p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())


def prepare_run_folder(
    output_dir: str | None, *, resume: str | None, overwrite: bool, log=print, check_only: bool = False
) -> tuple[Path, Path | None]:
    """Create or check the run folder and pick the checkpoint to resume from.

    Args:
        output_dir: the run folder.
        resume: None (a new run), "auto" (the latest checkpoint in the folder, if any) or a checkpoint folder.
        overwrite: delete an earlier run's files in the folder first.
        log: where the one-line notices go (e.g. "no checkpoint: starting fresh").
        check_only: only raise what would be refused (nothing is created, deleted or logged): run it before the
            slow model load so a wrong folder is refused at once.

    Returns:
        (run folder, checkpoint folder to resume from or None).

    Raises:
        ConfigError: the folder holds a run and neither resume nor overwrite was given, or both were given.
        CheckpointError: the checkpoint folder to resume from does not exist.
    """
    if not output_dir:
        raise ConfigError("output_dir is not set: where should checkpoints and metrics go? (uae-fast train --out)")
    if resume is not None and overwrite:
        raise ConfigError("resume and overwrite exclude each other: continue the run in the folder, or replace it")
    folder = Path(output_dir)
    if not check_only:
        ensure_output_dir(folder, option="output_dir")
    existing = run_files_in(folder) if folder.is_dir() else []
    if check_only:
        log = _silent
    if overwrite:
        if check_only:
            return folder, None
        for path in existing:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if existing:
            log(f"uae-fast: overwrite: removed the earlier run in {folder} ({len(existing)} entries)")
        return folder, None
    if resume is None:
        if existing:
            names = ", ".join(p.name for p in existing[:4]) + (", ..." if len(existing) > 4 else "")
            raise ConfigError(
                f"output_dir {folder} already holds a run ({names}): pass --resume to continue it, --overwrite to "
                "replace it, or choose another --out"
            )
        return folder, None
    if resume == "auto":
        checkpoint = latest_checkpoint(folder) if folder.is_dir() else None
        if checkpoint is None:
            log(f"uae-fast: --resume: no checkpoint in {folder}, starting fresh")
        return folder, checkpoint
    checkpoint = Path(resume)
    if not checkpoint.is_dir():
        raise CheckpointError(f"resume: checkpoint folder not found: {checkpoint}")
    return folder, checkpoint


def _silent(*_args, **_kwargs) -> None:
    pass
