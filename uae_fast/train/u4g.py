"""Stage 2b, "understanding for generation": Flow-GRPO on the decoder, the frozen captioner as the prompt source.

One step: draw B images → caption each with the frozen captioner (cached) and condition the decoder on each caption
once → render G images per caption from different noise (one noise with `u4g.same_noise`) with the SDE sampler,
keeping each trained step's transition and log-probability (`rollout`) → reward = similarity of each render to the
*source image*, group advantages per caption (`score`) → PPO-clipped update of the DiT's LoRA over the trained steps
(`update`). The reference policy is the DiT with its adapters disabled; Flow-GRPO-Fast's window
(`u4g.sde_window_size`) samples and trains a few consecutive steps only, the others being deterministic Euler steps.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import torch

from ..errors import UAEError
from ..models.decoder import ode_step
from ..rl.flow_grpo import flow_grpo_loss, sde_step, transition_logprob
from ..rl.grpo import GroupAdvantages
from .config import TrainConfig
from .data import ImageDataset, TrainImage
from .decoder_policy import DecoderPolicy
from .loop import StageTrainer
from .schedule import PhaseTimer, skip_updates
from .seeds import stable_seed

__all__ = ["Trajectories", "U4GTrainer"]


@dataclass
class Trajectories:
    """G renders of each of B captions, caption-major (render g of caption b at b * G + g)."""

    images: list[TrainImage]  # B sources
    captions: list[str]  # B
    cond: tuple  # the B captions' decoder conditioning (embeds, mask, pooled), computed once, shared by G renders
    steps: list[int]  # the trained denoising steps j (transition x_j → x_{j+1})
    latents: torch.Tensor  # [B*G, len(steps), 2, C, h, w] fp32: (x_j, x_{j+1}) of each trained step
    log_probs: torch.Tensor  # [B*G, len(steps)] under the rollout policy
    uncond: torch.Tensor | None  # [B*G, len(steps), C, h, w]: CFG's negative-branch velocity at each x_j (None: no CFG)
    renders: torch.Tensor  # [B*G, 3, H, W] in [0, 1]
    finite: torch.Tensor  # [B*G] bool: the trajectory stayed finite
    rewards: torch.Tensor | None = None  # [B*G], NaN where invalid
    advantages: torch.Tensor | None = None  # [B*G], clipped to ±adv_clip_max
    stats: GroupAdvantages | None = None


class U4GTrainer(StageTrainer):
    """Flow-GRPO on the decoder (recipe: setup → [caption → rollout → score] → update → save).

    Args:
        config: the run's :class:`TrainConfig` (stage-2b settings in `config.u4g`).
        uae: an already loaded :class:`uae_fast.api.UAE` (default: `uae_fast.load(config.model)`).
        dataset, reward: the image stream and the reward (default: new ones from the config); the unified
            schedule's two stages share them.
        steps: how many of the run's steps this stage trains (its LR schedule's length; default `max_steps`).
    """

    def __init__(self, config: TrainConfig, *, uae=None, dataset: ImageDataset | None = None, reward=None, steps=None):
        self.setup(config, uae=uae, dataset=dataset, reward=reward)
        cfg, s = config, config.u4g
        self.captions_per_rank = self.share(s.captions_per_step, "u4g.batch_size / u4g.num_generations (captions)")
        self.policy = DecoderPolicy(self.uae, cfg.decoder, s)
        if cfg.distributed.shard_frozen:  # conditioning: one LLM pass per step on every rank, in lockstep
            self.shard_frozen(self.uae.encoder, "the frozen captioner")
        self.captions: dict[str, str] = {}  # image key → caption (greedy: whole run; sampled: this epoch)
        self.captions_epoch = self.dataset.epoch
        updates = (cfg.max_steps if steps is None else steps) * s.num_updates
        self.build_optimizer([self.uae.decoder.transformer], learning_rate=s.learning_rate, updates=updates)

    def adapters(self) -> dict:
        return {"dit_lora": self.policy.peft_model}

    def forget_captions(self) -> None:
        """Drop the cached captions and conditioning (the captioner changed: the unified schedule trained it)."""
        self.captions.clear()
        self.policy.refresh_conditioning()

    # ------------------------------------------------------------------ phases
    @torch.no_grad()
    def caption(self, images: list[TrainImage]) -> list[str]:
        """The frozen captioner's caption of each image: greedy ones are kept for the run, sampled ones per epoch.

        The cache is not checkpointed (it would grow with the dataset): after a resume, captions are recomputed —
        greedy ones are the same, sampled ones are drawn at their step with that step's seed, as they would have been.
        """
        cfg = self.config
        missing = self.uncaptioned(images)
        if missing:
            greedy = cfg.u4g.captions == "greedy"
            # (each rank draws its own: sampled captions are not world-size invariant, greedy ones are)
            ranked = (self.runtime.rank,) if self.runtime.distributed else ()
            generator = torch.Generator(self.device).manual_seed(stable_seed(cfg.seed, self.step, 7, *ranked))
            texts = self.uae.captioner.caption(
                [im.pixels for im in missing],
                max_new_tokens=cfg.max_completion_length,
                temperature=0.0 if greedy else cfg.temperature,
                top_p=cfg.top_p,
                generator=generator,
            )
            self.captions.update({im.key: text for im, text in zip(missing, texts)})
        return [self.captions[im.key] for im in images]

    def uncaptioned(self, images: list[TrainImage]) -> list[TrainImage]:
        """The images (once each) that :meth:`caption` has no caption of yet (sampled ones: none from a past epoch)."""
        if self.config.u4g.captions == "sample" and self.captions_epoch != self.dataset.epoch:
            self.captions.clear()
            self.captions_epoch = self.dataset.epoch
        return [im for im in dict((im.key, im) for im in images).values() if im.key not in self.captions]

    def captioner_gathered(self, images: list[TrainImage]):
        """`distributed.shard_frozen`: the sharded captioner whole on every rank while any rank captions new images
        (its sampling loop stops when its own rows finish, so ranks do not run it in lockstep)."""
        if self.config.distributed.shard_frozen and self.runtime.max(len(self.uncaptioned(images))):
            return self.engine.frozen_gathered()
        return contextlib.nullcontext()

    def trained_steps(self) -> list[int]:
        """This step's SDE window (Flow-GRPO-Fast: a random start in the window range; default every step), minus
        a deterministic last step (cps at σ' = 0), cut to `timestep_fraction` of its steps."""
        s = self.config.u4g
        lo, hi = s.window_range
        if s.sde_window_size:
            start = random.Random(stable_seed(self.config.seed, self.step, 11)).randint(lo, hi - s.sde_window_size)
            lo, hi = start, start + s.sde_window_size
        window = [j for j in range(lo, hi) if not (s.sde_type == "cps" and j == s.num_steps - 1)]
        if not window:
            raise UAEError("u4g: the SDE window holds no stochastic step (cps's last step is deterministic)")
        return window[: max(1, round(len(window) * s.timestep_fraction))]

    @torch.no_grad()
    def rollout(self, images: list[TrainImage], captions: list[str]) -> Trajectories:
        """G renders per caption: SDE steps inside the window (log-probs kept), Euler steps elsewhere."""
        cfg, s = self.config, self.config.u4g
        g = s.num_generations
        steps = self.trained_steps()
        sigmas = self.policy.sigmas(s.num_steps)
        cond = self.policy.condition(captions)
        # same_noise: a caption's G renders start from one noise and differ only by the SDE's noise — the part the
        # log-probs credit — instead of mostly by their starting noise, which no gradient can credit.
        # Noise is a function of the render's place in the whole batch, so N ranks render what one process renders.
        where = self.batch_index(len(captions))
        seeds = [stable_seed(cfg.seed, self.step, j, 0 if s.same_noise else k) for j in where for k in range(g)]
        renders = [j * g + k for j in where for k in range(g)]
        pairs, log_probs, unconds, renders_out, finite = [], [], [], [], []
        for start in range(0, len(seeds), cfg.decoder.batch_size):
            rows = torch.arange(start, min(start + cfg.decoder.batch_size, len(seeds)))
            x = self.policy.initial_noise([seeds[i] for i in rows])
            chunk_cond = tuple(t[rows // g] for t in cond)
            # one generator per render for the SDE's ε (drawn in that render's own order of steps)
            generators = [torch.Generator(self.device).manual_seed(stable_seed(cfg.seed, self.step, 13, renders[i]))
                          for i in rows.tolist()]  # fmt: skip
            kept, logp, kept_uncond = [], [], []
            for j in range(s.num_steps):
                velocity, uncond = self.policy.rollout_velocity(x, sigmas[j], chunk_cond)
                if j in steps:
                    kept_uncond.append(uncond)
                    out = sde_step(
                        velocity, x, sigmas[j], sigmas[j + 1], noise_level=s.noise_level, sde_type=s.sde_type,
                        generator=generators,
                    )  # fmt: skip
                    kept.append(torch.stack([x, out.prev_sample], dim=1))
                    logp.append(out.log_prob)
                    x = out.prev_sample
                else:
                    x = ode_step(x, velocity, sigmas[j], sigmas[j + 1])
            ok = torch.isfinite(x).flatten(1).all(1) & torch.isfinite(torch.stack(logp, 1)).all(1)
            pairs.append(torch.stack(kept, dim=1))
            log_probs.append(torch.stack(logp, dim=1))
            if self.policy.uses_cfg:
                unconds.append(torch.stack(kept_uncond, dim=1))
            renders_out.append(self.policy.decode(torch.where(ok[:, None, None, None], x, 0.0)))
            finite.append(ok)
        uncond = torch.cat(unconds) if unconds else None
        return Trajectories(
            images, captions, cond, steps, torch.cat(pairs), torch.cat(log_probs), uncond, torch.cat(renders_out),
            torch.cat(finite),
        )  # fmt: skip

    @torch.no_grad()
    def score(self, batch: Trajectories) -> None:
        """Rewards against each caption's source image (NaN where invalid), advantages per caption, clipped."""
        cfg, s = self.config, self.config.u4g
        out = self.reward(
            [im.pixels for im in batch.images],
            batch.renders,
            source_ids=[im.key for im in batch.images],
            num_generations=s.num_generations,
            failed=~batch.finite,
        )
        batch.rewards = out.with_nan()
        batch.stats = self.group_advantages(batch.rewards, s.num_generations, s.scale_rewards)
        sign = -1.0 if cfg.negate_advantages else 1.0
        batch.advantages = sign * batch.stats.advantages.clamp(-s.adv_clip_max, s.adv_clip_max)

    def update(self, batch: Trajectories) -> dict[str, float]:
        """`num_updates` optimizer steps, each over a part of the captions' renders and every trained step."""
        cfg, s = self.config, self.config.u4g
        g, world = s.num_generations, self.runtime.world_size
        # A zero advantage contributes only its KL term: leave those renders out when beta is 0.
        use = batch.finite & ((batch.advantages != 0) | (s.beta > 0))
        sigmas = self.policy.sigmas(s.num_steps)
        # The parts split the whole batch's captions as one process does.
        total = len(batch.captions) * world
        part_of = torch.empty(total, dtype=torch.long)
        for p, members in enumerate(torch.arange(total).tensor_split(s.num_updates)):
            part_of[members] = p
        mine = part_of[self.batch_index(len(batch.captions))]
        metrics: dict[str, list[float]] = {}
        norms = []
        for p in range(s.num_updates):
            rows = ((mine == p).nonzero() * g + torch.arange(g)).flatten()  # the renders of this part's captions
            rows = rows[use[rows]]
            (count,) = self.runtime.sum(len(rows))  # the part's renders over all ranks: the loss is their mean
            if not count:
                skip_updates(self.scheduler)  # no signal in this part: no update; the schedule still advances
                continue
            chunks = list(rows.split(cfg.decoder.batch_size))
            # Engines in lockstep need as many passes on every rank: a rank with fewer repeats one, weighted 0.
            passes = self.engine.passes(len(chunks))
            for c in range(passes):
                real = c < len(chunks)
                mb = chunks[c] if real else self._filler_rows(batch)
                for k, j in enumerate(batch.steps):
                    last = c == passes - 1 and k == len(batch.steps) - 1
                    weight = len(mb) / (count * len(batch.steps)) if real else 0.0
                    m = self._train_pass(batch, sigmas, mb, k, j, weight, reuse_uncond=not norms, last=last)
                    if real:
                        for key, value in m.items():
                            metrics.setdefault(key, []).append(value * weight * world)
            norms.append(self.optimizer_step())
        parts = max(len(norms), 1)
        out = {k: sum(v) / parts for k, v in metrics.items()}
        out["grad_norm"] = sum(norms) / parts
        out["update/renders"] = int(use.sum())
        return out

    def _train_pass(self, batch: Trajectories, sigmas, mb, k: int, j: int, weight: float, *, reuse_uncond, last):
        """Forward and backward of renders `mb` at trained step j (the k-th; `sigmas`: the schedule), the loss
        scaled by `weight`; `last`: the update's final pass."""
        s = self.config.u4g
        x, x_next = batch.latents[mb, k, 0], batch.latents[mb, k, 1]
        mb_cond = tuple(t[mb // s.num_generations] for t in batch.cond)
        ref = None
        if s.beta > 0:
            with torch.no_grad(), self.policy.adapters_disabled():
                ref = self.policy.velocity(x, sigmas[j], mb_cond)
        # Until the first optimizer step the weights are the rollout's: its negative branch is reused.
        uncond = batch.uncond[mb, k] if batch.uncond is not None and reuse_uncond else None
        velocity = self.policy.velocity(x, sigmas[j], mb_cond, uncond)
        logp, kl = transition_logprob(
            velocity, x, x_next, sigmas[j], sigmas[j + 1], noise_level=s.noise_level, sde_type=s.sde_type,
            ref_velocity=ref,
        )  # fmt: skip
        loss, m = flow_grpo_loss(
            logp, batch.log_probs[mb, k], batch.advantages[mb], clip_range=s.clip_range, beta=s.beta, kl=kl
        )
        if weight and not torch.isfinite(loss):
            raise UAEError(f"step {self.step + 1}: the loss is {float(loss)}; lower u4g.learning_rate")
        self.backward(loss * weight if weight else velocity.sum() * 0.0, last=last)
        return {"loss": float(loss.detach()), **{key: float(value) for key, value in m.items()}}

    def _filler_rows(self, batch: Trajectories) -> torch.Tensor:
        """Renders for a zero-weighted pass: a finite one (any row when none is)."""
        finite = batch.finite.nonzero()[:, 0]
        return finite[:1] if len(finite) else torch.zeros(1, dtype=torch.long)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        """Caption → rollout → score → update. Returns the step's metrics."""
        timer = PhaseTimer(self.device)
        images = self.dataset.next_batch(self.captions_per_rank)
        with timer("caption"), self.captioner_gathered(images):
            captions = self.caption(images)
        with timer("rollout"), self.engine.gathered():
            batch = self.rollout(images, captions)
        with timer("score"):
            self.score(batch)
        with timer("update"):
            update_metrics = self.update(batch)
        self.step += 1
        renders = len(batch.finite)
        log_probs = batch.log_probs[batch.finite]
        valid = batch.rewards[torch.isfinite(batch.rewards)]
        times = {f"time/{k}": v for k, v in timer.times.items()}
        return {
            "reward": float(valid.mean()) if valid.numel() else float("nan"),
            "reward_std": float(batch.stats.group_std.mean()),
            "frac_reward_zero_std": batch.stats.num_zero_std_groups / len(captions),
            "reward/invalid": batch.stats.num_invalid_rewards,
            "rollout/nonfinite": int((~batch.finite).sum()),
            "rollout/logprob_mean": float(log_probs.mean()) if log_probs.numel() else float("nan"),
            "rollout/logprob_std": float(log_probs.std()) if log_probs.numel() > 1 else float("nan"),
            "rollout/trained_steps": len(batch.steps),
            "captions/truncated": self.policy.count_truncated(captions),
            "learning_rate": self.scheduler.get_last_lr()[0],
            "data/skipped_images": len(self.dataset.skipped),
            "data/epoch": self.dataset.epoch,
            **update_metrics,
            **times,
            "time/step": sum(timer.times.values()),
            "rollout/images_per_s": renders / timer.times["rollout"],
            "score/images_per_s": renders / timer.times["score"],
            "update/images_per_s": update_metrics["update/renders"] / timer.times["update"],
            "samples_per_s": renders / sum(timer.times.values()),
        }

    # ------------------------------------------------------------------ outputs
    @torch.no_grad()
    def report_columns(self, images: list[TrainImage]) -> dict[str, tuple[list[str], torch.Tensor, list[float]]]:
        """For the report: each image's caption rendered by the base DiT (adapters off) and the trained one, from the
        same noise with `eval_num_steps` Euler steps, and scored."""
        captions = self.caption(images)
        seeds = [self.config.seed + i for i in range(len(images))]
        columns = {}
        for label, trained in (("base", False), ("trained", True)):
            renders = self.policy.render(captions, seeds, steps=self.config.u4g.eval_num_steps, adapters=trained)
            out = self.reward([im.pixels for im in images], renders, num_generations=1)
            columns[label] = (captions, renders, out.with_nan().tolist())
        return columns
