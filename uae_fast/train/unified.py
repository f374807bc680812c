"""Unified-GRPO: stage 2a (GRPO on the captioner) and stage 2b (Flow-GRPO on the decoder) on one UAE in memory.

`unified.schedule` runs them one after the other (`g4u_steps` of 2a, then 2b) or alternating in blocks of
`alternate_every` steps. Each stage keeps its own adapters, optimizer and LR schedule (over its own steps); they
share the model, the image stream and the reward (whose cached source features serve both). Each stage rewards
what the other one currently is: 2a's captions are scored by the decoder 2b trains, and 2b re-captions its images
whenever 2a has changed the captioner.
"""

from __future__ import annotations

import contextlib

import torch

from .config import TrainConfig
from .data import TrainImage
from .g4u import G4UTrainer
from .loop import StageTrainer
from .u4g import U4GTrainer

__all__ = ["UnifiedTrainer"]


class UnifiedTrainer(StageTrainer):
    """Both stages on one UAE, step by step as `config.unified` schedules them.

    Args:
        config: the run's :class:`TrainConfig`: stage 2a's settings at the top level, stage 2b's in `u4g`.
        uae: an already loaded :class:`uae_fast.api.UAE` (default: `uae_fast.load(config.model)`).
    """

    def __init__(self, config: TrainConfig, *, uae=None):
        self.setup(config, uae=uae)
        cfg = config
        g4u_steps = sum(self.stage_at(k) == "g4u" for k in range(cfg.max_steps))
        shared = {"uae": self.uae, "dataset": self.dataset, "reward": self.reward}
        self.g4u = G4UTrainer(config, **shared, steps=g4u_steps)
        self.u4g = U4GTrainer(config, **shared, steps=cfg.max_steps - g4u_steps)

    def stage_at(self, step: int) -> str:
        return self.config.unified.stage_at(step, self.config.max_steps)

    def adapters(self) -> dict:
        return {**self.g4u.adapters(), **self.u4g.adapters()}

    def optimizers(self) -> dict:
        return {**self.g4u.optimizers(), **self.u4g.optimizers()}

    def engines(self) -> list:
        return [self.g4u.engine, self.u4g.engine]

    def train_step(self) -> dict[str, float]:
        """One step of the stage the schedule names: its metrics, also as `<stage>/reward`, `/reward_std`, `/kl`."""
        stage = self.stage_at(self.step)
        if stage == "u4g" and self.step > 0 and self.stage_at(self.step - 1) == "g4u":
            self.u4g.forget_captions()  # the captioner just changed: its captions (and maybe conditioning) are stale
        trainer, other = (self.g4u, self.u4g) if stage == "g4u" else (self.u4g, self.g4u)
        trainer.step = self.step  # seeds and logs follow the run's step count
        with other.engine.gathered():  # the other stage's model is this stage's frozen environment: whole
            metrics = trainer.train_step()
        self.step = trainer.step
        per_stage = {f"{stage}/{k}": metrics.get(k, float("nan")) for k in ("reward", "reward_std", "kl")}
        return {**metrics, **per_stage, "stage/u4g": float(stage == "u4g")}

    @torch.no_grad()
    def report_columns(self, images: list[TrainImage]) -> dict[str, tuple[list[str], torch.Tensor, list[float]]]:
        """For the report: greedy captions rendered with both adapters off (the base UAE) and both on."""
        cfg = self.config
        seeds = [cfg.seed + i for i in range(len(images))]
        columns = {}
        for label in ("base", "trained"):
            with contextlib.ExitStack() as stack:
                if label == "base":
                    stack.enter_context(self.g4u.policy.adapters_disabled())
                    stack.enter_context(self.u4g.policy.adapters_disabled())
                captions = self.uae.captioner.caption(
                    [im.pixels for im in images], max_new_tokens=cfg.max_completion_length, temperature=0.0
                )
                renders = self.u4g.policy.render(captions, seeds, steps=cfg.u4g.eval_num_steps)
            out = self.u4g.reward([im.pixels for im in images], renders, num_generations=1)
            columns[label] = (captions, renders, out.with_nan().tolist())
        return columns
