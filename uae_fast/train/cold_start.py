"""The cold start: semantic reconstruction through a short differentiable sampler, both adapters trained.

One step: draw B images → the captioner (its LLM LoRA on) captions each (`caption`; tokens are discrete, no gradient
flows through the sampling) → the caption's decoder conditioning under autograd: in `llm` mode the caption runs
through the encoder's LLM with its LoRA enabled and the projector (`condition`) — the encoder's only gradient path →
`cold_start.num_steps` Euler steps from fixed-per-step noise at `cold_start.size`, each step checkpointed
(`torch.utils.checkpoint`: only its input latents are kept, its activations are recomputed in the backward, so memory
does not grow with the steps) → VAE decode → features f of the reward backbone `cold_start.backbone` through its
differentiable preprocessing → loss 1 − cos(f(x̃), f(x)) → AdamW on the encoder's LLM LoRA and the DiT's LoRA.

`negate_advantages` (the control) flips the loss's sign. `eval/similarity` is the loss's cosine on the dataset's
first `cold_start.eval_images` images with fixed noise and greedy captions, measured before the first step and after
the last.
"""

from __future__ import annotations

import contextlib
import statistics

import torch
import torch.nn.functional as F

from ..errors import ConfigError, UAEError
from ..models.decoder import ode_step
from ..rewards.backbones import load_backbone
from ..rewards.preprocess import as_image_batch
from .config import TrainConfig
from .data import ImageDataset, TrainImage
from .decoder_policy import train_dit_lora
from .loop import StageTrainer
from .policy import CaptionPolicy
from .schedule import PhaseTimer
from .seeds import stable_seed

__all__ = ["ColdStartTrainer"]

EVAL_NOISE = 99  # seeds the evaluation noise apart from every training step's
EVAL_NOISES = 4  # noises per evaluation image


class ColdStartTrainer(StageTrainer):
    """Differentiable reconstruction (recipe: setup → [caption → reconstruct + backward] → update → save).

    Args:
        config: the run's :class:`TrainConfig` (cold-start settings in `config.cold_start`; the encoder's LoRA is the
            top-level `lora`, the DiT's `cold_start.dit_lora`).
        uae: an already loaded :class:`uae_fast.api.UAE` (default: `uae_fast.load(config.model)`).
        dataset, reward: the image stream and the reward (default: new ones from the config).
        steps: how many of the run's steps this stage trains (its LR schedules' length; default `max_steps`).
    """

    def __init__(self, config: TrainConfig, *, uae=None, dataset: ImageDataset | None = None, reward=None, steps=None):
        s = config.cold_start
        if s.train_encoder and config.decoder.conditioning != "llm":
            raise ConfigError(
                "cold_start.train_encoder needs decoder.conditioning=llm (text conditioning does not pass through "
                "the encoder): set cold_start.train_encoder=false"
            )
        self.setup(config, uae=uae, dataset=dataset, reward=reward)
        self.images_per_rank = self.share(s.batch_size, "cold_start.batch_size")
        self.backbone = self.reward.backbones.get(s.backbone) or load_backbone(
            s.backbone, config.reward.backbones[s.backbone], device=self.device
        )
        self.uae.encoder.requires_grad_(False)
        self.uae.decoder.requires_grad_(False)
        self.captioner = CaptionPolicy(self.uae.encoder, self.uae.processor, config.lora if s.train_encoder else None)
        if s.train_decoder:
            train_dit_lora(self.uae.decoder, s.lora_targets, s.dit_lora, section="cold_start")
        self.negative = None
        self.eval_set: list[TrainImage] | None = None
        updates = config.max_steps if steps is None else steps
        self.pairs = self.build_optimizers(
            {name: [model] for name, model in self.adapters().items()}, learning_rate=s.learning_rate, updates=updates
        )

    def adapters(self) -> dict:
        s = self.config.cold_start
        out = {"llm_lora": self.uae.encoder.lora_model if s.train_encoder else None,
               "dit_lora": self.uae.decoder.lora_model if s.train_decoder else None}  # fmt: skip
        return {k: v for k, v in out.items() if v is not None}

    def optimizers(self) -> dict:
        return dict(self.pairs)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for model in self.adapters().values() for p in model.parameters() if p.requires_grad]

    def adapters_disabled(self):
        """Context in which both models are their base (the report's "base" column)."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.captioner.adapters_disabled())
        stack.enter_context(self.uae.decoder.adapters_disabled())
        return stack

    # ------------------------------------------------------------------ the differentiable reconstruction
    @torch.no_grad()
    def caption(self, images: list[TrainImage], *, greedy: bool = False) -> list[str]:
        """One caption per image (sampled with this step's seed, or greedy), by the base captioner unless
        `cold_start.caption_with_adapters`: the tokens carry no gradient, and the LoRA trained through the conditioning
        then does not also move what is captioned (the evaluation's captions stay the same from start to end)."""
        cfg = self.config
        greedy = greedy or cfg.cold_start.captions == "greedy"
        # (each rank draws its own: sampled captions are not world-size invariant, greedy ones are)
        ranked = (self.runtime.rank,) if self.runtime.distributed and not greedy else ()
        generator = torch.Generator(self.device).manual_seed(stable_seed(cfg.seed, self.step, 7, *ranked))
        adapters = cfg.cold_start.caption_with_adapters
        with self.engine.gathered(), contextlib.nullcontext() if adapters else self.captioner.adapters_disabled():
            return self.captioner.caption(
                [im.pixels for im in images],
                max_new_tokens=cfg.max_completion_length,
                temperature=0.0 if greedy else cfg.temperature,
                top_p=cfg.top_p,
                generator=generator,
            )

    def condition(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embeds [B, L, D], mask [B, L], pooled [B, P]), under autograd in `llm` mode: the encoder's LLM (LoRA on)
        and projector run here, never from a cache, so the loss's gradient reaches the encoder's LoRA."""
        if self.uae.conditioning == "text":
            with torch.no_grad():
                return self.uae.condition(captions)
        return self.uae.project_caption_states(*self.uae.caption_states(captions))

    @torch.no_grad()
    def refresh_negative(self) -> None:
        """CFG's negative-prompt conditioning under the current adapters (they move every step: never cached)."""
        self.negative = None
        if self.config.decoder.guidance > 1.0:
            self.uae.clear_conditioning_cache()
            self.negative = self.uae.negative_conditioning()

    def _euler_step(self, x, sigma, sigma_next, embeds, mask, pooled) -> torch.Tensor:
        cond = (embeds, mask, pooled)
        v = self.uae.decoder.guided_velocity(
            x, sigma, cond, guidance=self.config.decoder.guidance, negative=self.negative
        )
        return ode_step(x, v, sigma, sigma_next)

    def sample(self, noise: torch.Tensor, cond: tuple, *, checkpointed: bool | None = None) -> torch.Tensor:
        """`cold_start.num_steps` Euler steps from `noise` [B, C, h, w]; under autograd each step is checkpointed
        (default: `cold_start.checkpoint_steps`): the backward keeps one step's activations at a time."""
        s = self.config.cold_start
        checkpointed = s.checkpoint_steps if checkpointed is None else checkpointed
        checkpointed = checkpointed and torch.is_grad_enabled()
        sigmas = self.uae.decoder.sigmas(s.num_steps)
        x = noise.to(torch.promote_types(noise.dtype, torch.float32))  # the trajectory in fp32 (see ode_step)
        for j in range(s.num_steps):
            args = (x, sigmas[j], sigmas[j + 1], *cond)
            x = self.engine.checkpoint(self._euler_step, *args) if checkpointed else self._euler_step(*args)
        return x

    def reconstruct(self, captions: list[str], seeds: list[int], *, checkpointed: bool | None = None) -> torch.Tensor:
        """Renders [B, 3, H, W] in [0, 1] of the captions from the seeds' noise (under autograd when enabled)."""
        side = self.config.cold_start.size
        noise = self.uae.decoder.initial_noise(seeds, side, side)
        return self.uae.decoder.decode_latents(self.sample(noise, self.condition(captions), checkpointed=checkpointed))

    def similarity(
        self, images: list[TrainImage], captions: list[str], seeds: list[int], *, checkpointed: bool | None = None
    ) -> torch.Tensor:
        """cos(f(x̃), f(x)) [B] of each image and its reconstruction, f the backbone's features (the loss's cosine)."""
        renders = self.reconstruct(captions, seeds, checkpointed=checkpointed)
        features = self.backbone.features_with_grad(renders)
        with torch.no_grad():
            pixels = as_image_batch([im.pixels for im in images])  # [3, H_i, W_i] each, in [0, 1]
            sources = self.backbone.features_with_grad([p.to(self.device) for p in pixels])
        return F.cosine_similarity(features, sources.to(features.dtype), dim=-1)

    def reconstruction_backward(self, images: list[TrainImage], captions: list[str]) -> tuple[torch.Tensor, float]:
        """The batch's loss mean(1 − cos) (sign flipped by `negate_advantages`), backpropagated in micro-batches of
        `decoder.batch_size` images. Returns (cos [B], loss)."""
        cfg = self.config
        sign = -1.0 if cfg.negate_advantages else 1.0
        # Noise by each image's place in the whole batch: N ranks render as one.
        world = self.runtime.world_size
        seeds = [stable_seed(cfg.seed, self.step, j) for j in self.batch_index(len(images))]
        count = len(images) * world
        sims, total = [], 0.0
        starts = list(range(0, len(images), cfg.decoder.batch_size))
        passes = self.engine.passes(len(starts))  # lockstep engines: as many passes on every rank
        for c in range(passes):
            part = slice(starts[min(c, len(starts) - 1)], starts[min(c, len(starts) - 1)] + cfg.decoder.batch_size)
            sim = self.similarity(images[part], captions[part], seeds[part])
            if c >= len(starts):  # a zero-weighted repeat
                self.backward(sim.sum() * 0.0, last=c == passes - 1)
                continue
            loss = sign * (1.0 - sim).sum() / count
            if not torch.isfinite(loss):
                raise UAEError(f"step {self.step + 1}: the loss is {float(loss)}; lower cold_start.learning_rate")
            self.backward(loss, last=c == passes - 1)
            sims.append(sim.detach())
            total += float(loss.detach()) * world  # this rank's share, at the scale of the whole batch's loss
        return torch.cat(sims), total

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        """Caption → reconstruct with grad → update (evaluation before the first step and after the last)."""
        cfg, s = self.config, self.config.cold_start
        timer = PhaseTimer(self.device)
        evals = {}
        if self.step == 0 and s.eval_images:
            with timer("eval"):
                evals = self.evaluate()
        images = self.dataset.next_batch(self.images_per_rank)
        with timer("caption"):
            captions = self.caption(images)
        with timer("reconstruct"):  # forward and backward
            self.refresh_negative()
            sims, loss = self.reconstruction_backward(images, captions)
        with timer("update"):
            grad_norm = self.optimizer_step()
        self.step += 1
        if self.step == cfg.max_steps and s.eval_images:
            with timer("eval"):
                evals = self.evaluate()
        times = {f"time/{k}": v for k, v in timer.times.items()}
        return {
            "loss": loss,
            "reward": float(sims.mean()),
            "reward_std": float(sims.std()) if len(sims) > 1 else 0.0,
            "grad_norm": grad_norm,
            "learning_rate": next(iter(self.pairs.values()))[1].get_last_lr()[0],
            "completions/mean_length": statistics.mean(len(c.split()) for c in captions),
            "data/skipped_images": len(self.dataset.skipped),
            "data/epoch": self.dataset.epoch,
            **evals,
            **times,
            "time/step": sum(timer.times.values()),
            "samples_per_s": len(images) / sum(timer.times.values()),
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The loss's cosine on the fixed evaluation images, each reconstructed from `EVAL_NOISES` fixed noises with
        its greedy caption (no checkpointing; the global RNG is not touched): `eval/similarity` (the mean) and
        `eval/similarity_std` (the std over an image's noises, averaged over the images: the scale of chance)."""
        cfg, s = self.config, self.config.cold_start
        if self.eval_set is None:
            self.eval_set = self.dataset.preview(s.eval_images)
        self.refresh_negative()
        k = EVAL_NOISES
        images = [im for im in self.eval_set for _ in range(k)]
        captions = [c for c in self.caption(self.eval_set, greedy=True) for _ in range(k)]
        seeds = [stable_seed(cfg.seed, EVAL_NOISE, i // k, i % k) for i in range(len(images))]
        sims = []
        for lo in range(0, len(seeds), cfg.decoder.batch_size):
            part = slice(lo, lo + cfg.decoder.batch_size)
            sims.append(self.similarity(images[part], captions[part], seeds[part]))
        sims = torch.cat(sims).view(-1, k)
        return {"eval/similarity": float(sims.mean()), "eval/similarity_std": float(sims.std(dim=1).mean())}

    # ------------------------------------------------------------------ outputs
    @torch.no_grad()
    def report_columns(self, images: list[TrainImage]) -> dict[str, tuple[list[str], torch.Tensor, list[float]]]:
        """For the report: greedy captions reconstructed (the cold start's sampler) with both adapters off (the base
        UAE) and on, from the same noise, scored by the run's reward."""
        seeds = [self.config.seed + i for i in range(len(images))]
        columns = {}
        for label in ("base", "trained"):
            with self.adapters_disabled() if label == "base" else contextlib.nullcontext():
                self.refresh_negative()
                captions = self.caption(images, greedy=True)
                renders = torch.cat(
                    [self.reconstruct(captions[i : i + 1], seeds[i : i + 1]) for i in range(len(images))]
                )
            out = self.reward([im.pixels for im in images], renders, num_generations=1)
            columns[label] = (captions, renders, out.with_nan().tolist())
        self.refresh_negative()
        return columns
