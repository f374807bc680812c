"""The run loop every stage shares: run folder, resume, steps, logging, checkpoints, the final outputs.

A stage's trainer subclasses :class:`StageTrainer` and says only what is its own: how it is built (:meth:`setup` gives
the config, model, device, reward and images; :meth:`build_optimizer` the optimizer and schedule), what one step does
(:meth:`train_step`), which adapters it trains (:meth:`adapters`, saved in the released layout, and
:meth:`optimizers`, their optimizers) and, for the run's report, :meth:`report_columns`; :meth:`finish` writes the
final model and the report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml

from ..io import write_text_atomic
from .metrics import MetricsLogger
from .run_folder import prepare_run_folder
from .schedule import make_scheduler
from .state import (
    check_same_config,
    load_trainer_state,
    prune_checkpoints,
    restore_adapters,
    restore_optimizers,
    restore_rng,
    save_checkpoint,
)

__all__ = ["StageTrainer"]


class StageTrainer:
    """Base class of the stage trainers (see the module docstring for what a subclass provides)."""

    config = None
    device: torch.device
    optimizer: torch.optim.Optimizer
    dataset = None
    step = 0  # optimizer steps done (one per train_step)

    # ------------------------------------------------------------------ what a stage provides
    def train_step(self) -> dict[str, float]:
        """One step (rollouts and update); returns the step's metrics."""
        raise NotImplementedError

    def adapters(self) -> dict:
        """Folder name in the released layout (`llm_lora`, `dit_lora`) → the PEFT model trained under it."""
        raise NotImplementedError

    def optimizers(self) -> dict:
        """Adapter folder name → the (optimizer, LR scheduler) pair training it. Default: the one optimizer built by
        :meth:`build_optimizer`, for the one adapter of :meth:`adapters`."""
        (name,) = self.adapters()
        return {name: (self.optimizer, self.scheduler)}

    def report_columns(self, images: list) -> dict:
        """For the report: {"base": ..., "trained": ...}, each (captions, renders [N, 3, H, W], rewards) of `images`."""
        raise NotImplementedError

    def finish(self, run_dir: Path) -> None:
        """What a run leaves: the trained model in the released layout (`final/`, loadable by `uae_fast.load`) and
        the report (`report/`, from the stage's `report_columns`)."""
        from .report import write_report

        if self.config.save_final_model:
            self.uae.save_pretrained(run_dir / "final")
        if self.config.report_images:
            write_report(self, run_dir)

    # ------------------------------------------------------------------ shared parts
    def setup(self, config, *, uae=None, dataset=None, reward=None) -> None:
        """What every stage starts from: `config`, step 0, the seeded RNG, the model, its device, the reward and the
        image stream — the given ones (the unified schedule's stages share them) or new ones from the config."""
        from .. import api
        from ..rewards.reconstruction import ReconstructionReward
        from .data import open_dataset

        self.config, self.step = config, 0
        torch.manual_seed(config.seed)
        self.uae = uae or api.load(
            config.model, conditioning=config.decoder.conditioning, device=config.device, seed=config.seed
        )
        self.device = self.uae.device
        # Neither touches the global RNG (the tiny backbones fork it), so the adapters' init does not depend on them.
        self.reward = reward or ReconstructionReward.from_config(config.reward, device=self.device)
        self.dataset = dataset or open_dataset(config.data, seed=config.seed)

    def build_optimizer(self, params: list[torch.nn.Parameter], *, learning_rate: float, updates: int) -> None:
        """AdamW over `params` and the warmup + constant/linear/cosine schedule over `updates` optimizer steps."""
        cfg = self.config
        self.optimizer = torch.optim.AdamW(
            params, lr=learning_rate, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay
        )
        self.scheduler = make_scheduler(self.optimizer, warmup=cfg.warmup_steps, total=updates, kind=cfg.lr_scheduler)

    def optimizer_step(self, params: list[torch.nn.Parameter]) -> float:
        """Clip the gradient norm of `params` at `max_grad_norm` (0: no clipping), step every optimizer of
        :meth:`optimizers` and its LR schedule, and clear the gradients. Returns the norm before clipping."""
        limit = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
        for optimizer, scheduler in self.optimizers().values():
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, run_dir: Path) -> Path:
        """Checkpoint `run_dir/checkpoint-<step>/` (adapters in the released layout + the full trainer state)."""
        folder = save_checkpoint(
            Path(run_dir) / f"checkpoint-{self.step}",
            adapters=self.adapters(),
            optimizers=self.optimizers(),
            step=self.step,
            data_state=self.dataset.state_dict(),
            config=self.config.to_dict(),
        )
        prune_checkpoints(Path(run_dir), self.config.save_total_limit)
        return folder

    def resume(self, folder: Path) -> None:
        """Restore adapters, optimizers, schedules, RNG, data position and step from a checkpoint folder."""
        folder = Path(folder)
        state, tensors = load_trainer_state(folder)
        check_same_config(folder, self.config.to_dict())
        restore_adapters(folder, self.adapters(), self.device)
        restore_optimizers(folder, self.optimizers(), state, tensors)
        self.dataset.load_state_dict(state["data"])
        restore_rng(tensors)
        self.step = state["step"]

    def train(self) -> Path:
        """Train to `max_steps`, logging and checkpointing, then write the final outputs. Returns the run folder."""
        cfg = self.config
        run_dir, checkpoint = prepare_run_folder(
            cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite, log=_notice
        )
        if checkpoint is not None:
            self.resume(checkpoint)
        write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        logger = MetricsLogger(run_dir, total_steps=cfg.max_steps, start_step=self.step, tensorboard=cfg.tensorboard)
        try:
            while self.step < cfg.max_steps:
                metrics = self.train_step()
                if self.step % cfg.logging_steps == 0 or self.step == cfg.max_steps:
                    logger.log(self.step, metrics)
                logger.advance()
                if cfg.save_steps and self.step % cfg.save_steps == 0:
                    self.save(run_dir)
        finally:
            logger.close()
        if not (run_dir / f"checkpoint-{self.step}").exists():
            self.save(run_dir)
        skipped = getattr(self.dataset, "skipped", None)
        if skipped:
            write_text_atomic(run_dir / "skipped.json", json.dumps(skipped, indent=2) + "\n")
        self.finish(run_dir)
        return run_dir


def _notice(message: str) -> None:
    print(message, file=sys.stderr)
