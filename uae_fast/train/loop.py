"""The run loop every stage shares: run folder, resume, steps, logging, checkpoints, the final outputs.

A stage's trainer subclasses :class:`StageTrainer` and says only what is its own: how it is built (:meth:`setup` gives
the config, model, device, reward and images; :meth:`build_optimizer` the optimizer and schedule, or
:meth:`build_optimizers` one per adapter), what one step does
(:meth:`train_step`), which adapters it trains (:meth:`adapters`, saved in the released layout, and
:meth:`optimizers`, their optimizers) and, for the run's report, :meth:`report_columns`; :meth:`finish` writes the
final model and the report.

Under a launcher every rank runs the same loop (:mod:`uae_fast.dist`): :meth:`share` splits the global batch, the
stage's losses go through :meth:`backward` and :meth:`optimizer_step` (the run's engine reduces the gradients), and
saving gathers whole tensors on every rank for rank 0 to write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import torch
import yaml

from ..errors import ConfigError
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
from .weights import trained_state

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

        if self.config.save_final_model:  # every rank: sharded weights are gathered; rank 0 writes
            with contextlib.ExitStack() as stack:
                for engine in self.engines():
                    stack.enter_context(engine.whole_state_dicts())
                self.uae.save_pretrained(run_dir / "final", write=self.runtime.is_main)
        if self.config.report_images:
            with contextlib.ExitStack() as stack:
                for engine in self.engines():  # rank 0 renders alone: everything whole
                    stack.enter_context(engine.gathered())
                    stack.enter_context(engine.frozen_gathered())
                if self.runtime.is_main:
                    write_report(self, run_dir)
            self.runtime.barrier()

    def engines(self) -> list:
        """The engines placing this stage's trained modules (the unified schedule has one per stage)."""
        return [self.engine]

    def engine_for(self, optimizer):
        """The engine that took charge of `optimizer`."""
        return next(engine for engine in self.engines() if any(optimizer is o for o in engine.optimizers))

    # ------------------------------------------------------------------ shared parts
    def setup(self, config, *, uae=None, dataset=None, reward=None) -> None:
        """What every stage starts from: `config`, step 0, the seeded RNG, the model, its device, the reward and the
        image stream — the given ones (the unified schedule's stages share them) or new ones from the config."""
        from .. import api
        from ..dist import current, make_engine
        from ..rewards.reconstruction import ReconstructionReward
        from .data import open_dataset

        self.config, self.step = config, 0
        self.runtime = current()
        self.engine = make_engine(config.distributed, self.runtime)
        torch.manual_seed(config.seed)
        self.uae = uae or api.load(
            config.model, conditioning=config.decoder.conditioning, device=config.device, seed=config.seed
        )
        self.device = self.uae.device
        # Neither touches the global RNG (the tiny backbones fork it), so the adapters' init does not depend on them.
        self.reward = reward or ReconstructionReward.from_config(config.reward, device=self.device)
        self.dataset = dataset or open_dataset(
            config.data, seed=config.seed, rank=self.runtime.rank, world_size=self.runtime.world_size
        )

    def shard_frozen(self, module: torch.nn.Module, what: str) -> None:
        """`distributed.shard_frozen`: the blocks of a frozen model (`what` names it in the job log) sharded over the
        ranks; its passes must then run in lockstep on every rank, or inside `engine.frozen_gathered()`."""
        from ..dist.engines import held_bytes

        if not self.runtime.distributed:  # one process holds everything
            return
        whole = held_bytes(module)
        self.engine.shard_frozen(module)
        if self.runtime.is_main:
            mib = f"{held_bytes(module) / 2**20:.2f} of its {whole / 2**20:.2f} MiB"
            _notice(f"distributed.shard_frozen: each rank holds {mib} of {what}")

    def share(self, count: int, what: str) -> int:
        """This rank's part of a global count (`what` names the setting); the ranks split it evenly.

        Raises:
            ConfigError: `count` is not a multiple of the number of processes.
        """
        world = self.runtime.world_size
        if count % world:
            raise ConfigError(f"{what} = {count} does not split over {world} processes: make it a multiple of {world}")
        return count // world

    def batch_index(self, count: int) -> list[int]:
        """Where this rank's `count` items (images, pairs, captions) sit in the step's whole batch: the data stream
        interleaves the ranks, so item k of rank r is item k·W + r of the batch one process would draw."""
        world, rank = self.runtime.world_size, self.runtime.rank
        return [k * world + rank for k in range(count)]

    def group_advantages(self, rewards: torch.Tensor, num_generations: int, scale_rewards: str):
        """:func:`uae_fast.rl.grpo.group_advantages` of this rank's groups; with `scale_rewards="batch"` the scale is
        the std of the whole batch's rewards (every rank's), as one process would take it."""
        from ..rl.grpo import group_advantages

        stats = group_advantages(rewards, num_generations, scale_rewards)
        if scale_rewards != "batch" or not self.runtime.distributed:
            return stats
        everyone = torch.cat([r.to(rewards.device) for r in self.runtime.gather(rewards.cpu())])
        rank, n = self.runtime.rank, len(rewards)
        whole = group_advantages(everyone, num_generations, "batch").advantages[rank * n : (rank + 1) * n]
        return dataclasses.replace(stats, advantages=whole)

    def build_optimizer(self, modules: list[torch.nn.Module], *, learning_rate: float, updates: int) -> None:
        """:meth:`build_optimizers` for a stage with one optimizer: `self.optimizer` and `self.scheduler`."""
        pairs = self.build_optimizers({"": modules}, learning_rate=learning_rate, updates=updates)
        ((self.optimizer, self.scheduler),) = pairs.values()

    def build_optimizers(self, named: dict[str, list[torch.nn.Module]], *, learning_rate: float, updates: int) -> dict:
        """Place every module of `named` (those holding the trained parameters) on the ranks with the run's engine,
        then per name an AdamW over its modules' trainable parameters and the warmup + constant/linear/cosine
        schedule over `updates` steps. The engine takes charge of all of them at once (DeepSpeed builds one engine
        over them). Returns name → (optimizer, scheduler)."""
        cfg = self.config
        modules = [module for group in named.values() for module in group]
        self.engine.shard(modules)
        optimizers = {
            name: torch.optim.AdamW(
                [p for module in group for p in module.parameters() if p.requires_grad],
                lr=learning_rate,
                betas=tuple(cfg.adam_betas),
                weight_decay=cfg.weight_decay,
            )
            for name, group in named.items()
        }
        self.engine.attach(modules, list(optimizers.values()), cfg.max_grad_norm)
        return {
            name: (opt, make_scheduler(opt, warmup=cfg.warmup_steps, total=updates, kind=cfg.lr_scheduler))
            for name, opt in optimizers.items()
        }

    def backward(self, loss: torch.Tensor, *, last: bool = True) -> None:
        """Backward of this rank's share of the global batch's loss (`last`: the step's final pass)."""
        self.engine.backward(loss, last=last)

    def optimizer_step(self) -> float:
        """Average the gradients over the ranks, clip their norm at `max_grad_norm` (0: no clipping), step every
        optimizer of :meth:`optimizers` and its LR schedule, and clear the gradients. Returns the norm before
        clipping."""
        pairs = list(self.optimizers().values())
        norm = self.engine.step([optimizer for optimizer, _ in pairs])
        for _, scheduler in pairs:
            scheduler.step()
        return norm

    def save(self, run_dir: Path) -> Path:
        """Checkpoint `run_dir/checkpoint-<step>/` (adapters in the released layout + the full trainer state).

        Every rank calls it (whole tensors are gathered from the shards); rank 0 writes."""
        engine, runtime = self.engine, self.runtime
        adapters = {
            name: (trained, {k: engine.full(v) for k, v in trained_state(trained).items()})
            for name, trained in self.adapters().items()
        }
        optimizers = {
            name: (self.engine_for(opt).optimizer_state(opt), sched) for name, (opt, sched) in self.optimizers().items()
        }
        data_states = runtime.gather(self.dataset.state_dict())
        rng_states = runtime.gather(torch.get_rng_state())
        folder = Path(run_dir) / f"checkpoint-{self.step}"
        if runtime.is_main:
            save_checkpoint(
                folder,
                adapters=adapters,
                optimizers=optimizers,
                step=self.step,
                data_states=data_states,
                rng_states=rng_states,
                config=self.config.to_dict(),
            )
            prune_checkpoints(Path(run_dir), self.config.save_total_limit)
        runtime.barrier()
        return folder

    def resume(self, folder: Path) -> None:
        """Restore adapters, optimizers, schedules, RNG, data position and step from a checkpoint folder — one
        written by any number of processes with any engine."""
        folder = Path(folder)
        state, tensors = load_trainer_state(folder)
        check_same_config(folder, self.config.to_dict())
        restore_adapters(folder, self.adapters(), self.engine)

        def load(optimizer, saved: dict) -> None:
            self.engine_for(optimizer).load_optimizer_state(optimizer, saved)

        restore_optimizers(folder, self.optimizers(), state, tensors, load)
        ranks = state.get("data_ranks", [state["data"]])
        rank = self.runtime.rank
        self.dataset.load_state_dict(ranks[rank] if len(ranks) == self.runtime.world_size else ranks[0])
        restore_rng(tensors, rank)
        self.step = state["step"]

    def train(self) -> Path:
        """Train to `max_steps`, logging and checkpointing, then write the final outputs. Returns the run folder.

        Under a launcher every rank runs it; rank 0 alone checks the run folder, logs and writes."""
        cfg, runtime = self.config, self.runtime
        run_dir, checkpoint = runtime.on_main(
            lambda: prepare_run_folder(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite, log=_notice)
        )
        if checkpoint is not None:
            self.resume(checkpoint)
        logger = None
        if runtime.is_main:
            write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            logger = MetricsLogger(
                run_dir, total_steps=cfg.max_steps, start_step=self.step, tensorboard=cfg.tensorboard
            )
        try:
            while self.step < cfg.max_steps:
                metrics = self.train_step()
                if self.step % cfg.logging_steps == 0 or self.step == cfg.max_steps:
                    metrics = merge_rank_metrics(runtime.gather({**metrics, "memory/peak_gb": peak_memory_gb()}))
                    if logger is not None:
                        logger.log(self.step, metrics)
                if logger is not None:
                    logger.advance()
                if cfg.save_steps and self.step % cfg.save_steps == 0:
                    self.save(run_dir)
        finally:
            if logger is not None:
                logger.close()
        if not (run_dir / f"checkpoint-{self.step}").exists():
            self.save(run_dir)
        skipped = [entry for rank in runtime.gather(getattr(self.dataset, "skipped", [])) for entry in rank]
        if skipped and runtime.is_main:
            write_text_atomic(run_dir / "skipped.json", json.dumps(skipped, indent=2) + "\n")
        self.finish(run_dir)
        runtime.barrier()
        return run_dir


# Metrics that count or measure throughput add up over the ranks; memory is the largest rank's; the rest averaged.
_SUMMED = ("data/skipped_images", "reward/invalid", "update/sequences")


def merge_rank_metrics(per_rank: list[dict]) -> dict:
    """One metrics dict from every rank's: sums for counts and rates (`*_per_s`), the maximum for `memory/*`, means
    for the rest."""
    if len(per_rank) == 1:
        return per_rank[0]
    merged = {}
    for key in dict.fromkeys(k for metrics in per_rank for k in metrics):
        values = [float(m[key]) for m in per_rank if key in m]
        if key.startswith("memory/"):
            merged[key] = max(values)
        elif key in _SUMMED or key.endswith("_per_s"):
            merged[key] = sum(values)
        else:
            merged[key] = sum(values) / len(values)
    return merged


def peak_memory_gb() -> float:
    """This process's peak memory so far, GiB: the CUDA allocator's peak on a GPU, else the peak resident set."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _notice(message: str) -> None:
    print(message, file=sys.stderr)
