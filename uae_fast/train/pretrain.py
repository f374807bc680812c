"""Stage 1: long-caption pretraining of the decoder with SD3's rectified-flow loss.

One step: draw B (image, long caption) pairs → fit each image to the step's resolution (the schedule in
`pretrain.resolutions`) → VAE latents → the captions' conditioning (`llm` mode: the frozen LLM's hidden states,
cached per caption, then the trained projector; `text` mode: SD3's text encoders, cached) → noise at σ drawn from
the weighting scheme's density → the DiT's velocity vs ε − x₀, weighted → AdamW on the DiT (LoRA or every weight)
and the projector → EMA of the trained weights.

Whether the decoder learns the *conditioning* (and not only the images) is measured on a fixed evaluation set: the
loss with each image's own caption against the loss with the captions shuffled among the images, from the same noise
at the same σ (`eval/loss_own`, `eval/loss_shuffled`, `eval/caption_gain` = their difference).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..data.shards import aspect_bucket
from ..errors import ConfigError, UAEError
from .caption_cache import ConditioningCache
from .config import TrainConfig
from .data import TrainImage
from .decoder_policy import caption_conditioning, train_dit_lora
from .flow_matching import flow_matching_loss, loss_weights, noisy_latents, sample_sigmas
from .loop import StageTrainer
from .schedule import PhaseTimer
from .seeds import stable_seed
from .weights import EMA, FullWeights

__all__ = ["PretrainTrainer", "fit_image"]

EVAL_REPEATS = 16  # σ / noise draws per evaluation image: the gain is a difference of noisy losses


def fit_image(pixels, height: int, width: int) -> torch.Tensor:
    """uint8 [H, W, 3] → float [3, height, width] in [0, 1]: centre crop to the target's aspect, antialiased resize."""
    x = torch.from_numpy(pixels).permute(2, 0, 1).float()
    h, w = x.shape[1:]
    if h * width > w * height:  # too tall: crop rows
        crop = max(1, round(w * height / width))
        top = (h - crop) // 2
        x = x[:, top : top + crop]
    else:
        crop = max(1, round(h * width / height))
        left = (w - crop) // 2
        x = x[:, :, left : left + crop]
    x = F.interpolate(x[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]
    return (x / 255.0).clamp_(0.0, 1.0)


class PretrainTrainer(StageTrainer):
    """Stage 1 (recipe: setup → [pairs → latents → conditioning → rectified-flow loss] → update → save).

    Args:
        config: the run's :class:`TrainConfig` (stage-1 settings in `config.pretrain`).
        uae, dataset: an already loaded UAE / pair stream (default: new ones from the config).
    """

    def __init__(self, config: TrainConfig, *, uae=None, dataset=None):
        self.setup(config, uae=uae, dataset=dataset)
        s = config.pretrain
        decoder, encoder = self.uae.decoder, self.uae.encoder
        encoder.requires_grad_(False)
        decoder.vae.requires_grad_(False)
        self.train_projector = config.decoder.conditioning == "llm" and s.train_projector
        self.trained: dict = {}
        self.uncaptioned: set[str] = set()  # keys skipped for their caption (listed once, not once per epoch)
        if s.finetune == "lora":
            train_dit_lora(decoder, s.lora_targets, s.lora, section="pretrain")
            self.trained["dit_lora"] = decoder.lora_model
        else:
            if decoder.lora_model is not None:
                raise ConfigError("pretrain.finetune=full: this checkpoint's DiT carries dit_lora/; use finetune=lora")
            decoder.transformer.requires_grad_(True)
            self.trained["dit"] = FullWeights(decoder.transformer)
        if self.train_projector:
            encoder.projector.requires_grad_(True)
            self.trained["projector"] = FullWeights(encoder.projector)
        if s.gradient_checkpointing:
            decoder.enable_gradient_checkpointing()
        smallest = min(int(side) for _, side in s.resolutions)
        if config.data.aspect_buckets and smallest < 64:
            raise ConfigError(f"data.aspect_buckets needs pretrain.resolutions sides >= 64 (got {smallest})")
        self.pairs_per_rank = self.share(s.batch_size, "pretrain.batch_size")
        modules = [decoder.transformer] + ([encoder.projector] if self.train_projector else [])
        self.build_optimizer(modules, learning_rate=s.learning_rate, updates=config.max_steps)
        # After build_optimizer: a sharding engine replaces the parameters it shards.
        named = {f"dit.{n}": p for n, p in decoder.transformer.named_parameters() if p.requires_grad}
        if self.train_projector:
            named.update({f"projector.{n}": p for n, p in encoder.projector.named_parameters()})
        self.ema = EMA(named, s.ema_decay, self.engine) if s.ema_decay else None
        if self.ema is not None:
            self.trained["ema"] = self.ema
        self.cache = ConditioningCache(self._frozen_conditioning, size=s.conditioning_cache, device=self.device)
        self.shift = float(decoder.scheduler.config.get("shift", 1.0))

    def adapters(self) -> dict:
        return self.trained

    def optimizers(self) -> dict:
        return {"pretrain": (self.optimizer, self.scheduler)}

    # ------------------------------------------------------------------ data and conditioning
    def next_pairs(self, count: int) -> list[TrainImage]:
        """The next `count` pairs whose caption has at least `pretrain.min_caption_words` words; the others are
        skipped and listed once each in the dataset's `skipped` list (the run's skipped.json)."""
        need = max(self.config.pretrain.min_caption_words, 1)
        pairs, start_epoch = [], self.dataset.epoch
        while len(pairs) < count:
            for im in self.dataset.next_batch(count - len(pairs)):
                words = len((im.reference_caption or "").split())
                if words >= need:
                    pairs.append(im)
                    continue
                if im.key not in self.uncaptioned:
                    self.uncaptioned.add(im.key)
                    reason = "no caption" if im.reference_caption is None else f"caption of {words} words (< {need})"
                    self.dataset.skipped.append({"image": im.key, "reason": reason})
            if not pairs and self.dataset.epoch > start_epoch + 1:
                raise ConfigError(
                    f"no training image has a caption of at least {need} words: stage 1 trains on (image, caption) "
                    "pairs — build shards with `uae-fast data build` and set data.shards=DIR"
                )
        return pairs

    @torch.no_grad()
    def _frozen_conditioning(self, captions: list[str]):
        """What the cache keeps: the LLM's hidden states when the projector trains, else the whole conditioning."""
        with caption_conditioning(self.uae, self.config.decoder):
            if self.train_projector:
                hidden, mask = self.uae.caption_states(captions)
                return hidden, mask, None
            return self.uae.condition(captions)

    def condition(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt_embeds [B, L, D], mask [B, L], pooled [B, P]); through the trained projector under autograd."""
        sequence, mask, pooled = self.cache(captions)
        if self.train_projector:
            return self.uae.project_caption_states(sequence, mask)
        return sequence, mask, pooled

    def latents(self, pairs: list[TrainImage], side: int, generator: torch.Generator, share=None) -> torch.Tensor:
        """VAE latents of the pairs' images fitted to side² — or, with `data.aspect_buckets`, to their bucket's
        shape of about that area (a bucketed batch shares one bucket). `share`: see `UAEDecoder.encode_images`."""
        height, width = side, side
        if self.config.data.aspect_buckets:
            height, width = aspect_bucket(*pairs[0].pixels.shape[:2], side)
        pixels = torch.stack([fit_image(p.pixels, height, width) for p in pairs])
        return self.uae.decoder.encode_images(pixels, generator=generator, share=share)

    def losses(self, latents, captions: list[str], sigmas, noise) -> torch.Tensor:
        """[B] weighted rectified-flow losses of the DiT's velocity at x_σ, conditioned on `captions`."""
        s = self.config.pretrain
        noise = noise.to(latents.device, latents.dtype)
        cond = self.condition(captions)
        prediction = self.uae.decoder.velocity(noisy_latents(latents, noise, sigmas), sigmas.to(self.device), *cond)
        return flow_matching_loss(prediction, latents, noise, loss_weights(sigmas, s.weighting_scheme))

    def sigmas(self, count: int, generator: torch.Generator) -> torch.Tensor:
        s = self.config.pretrain
        return sample_sigmas(
            count, scheme=s.weighting_scheme, shift=self.shift, logit_mean=s.logit_mean, logit_std=s.logit_std,
            mode_scale=s.mode_scale, generator=generator,
        )  # fmt: skip

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        cfg, s = self.config, self.config.pretrain
        timer = PhaseTimer(self.device)
        metrics = self.evaluate() if self.step == 0 else {}
        generator = torch.Generator().manual_seed(stable_seed(cfg.seed, self.step, 1))
        side = s.resolution_at(self.step)
        with timer("data"):
            pairs = self.next_pairs(self.pairs_per_rank)
        # Noise is drawn for the whole batch (every rank's pairs) and each rank takes its pairs' part: N processes
        # train on what one process would.
        total, mine = self.pairs_per_rank * self.runtime.world_size, self.batch_index(len(pairs))
        with timer("encode"):
            latents = self.latents(pairs, side, generator, share=(total, mine))
        sigmas = self.sigmas(total, generator)[mine]
        noise = torch.randn((total, *latents.shape[1:]), generator=generator)[mine]
        with timer("update"):
            losses = self.losses(latents, [p.reference_caption for p in pairs], sigmas, noise)
            loss = losses.detach().mean()
            if not torch.isfinite(loss):
                raise UAEError(f"step {self.step + 1}: the loss is {float(loss)}; lower pretrain.learning_rate")
            self.backward(losses.sum() / total)  # this rank's share of the whole batch's mean
            grad_norm = self.optimizer_step()
            if self.ema is not None:
                self.ema.update()
        self.step += 1
        if self.step == cfg.max_steps or (s.eval_steps and self.step % s.eval_steps == 0):
            metrics.update(self.evaluate())
        total = sum(timer.times.values())
        return {
            "loss": float(loss.detach()),
            "grad_norm": grad_norm,
            "learning_rate": self.scheduler.get_last_lr()[0],
            "resolution": side,
            "sigma_mean": float(sigmas.mean()),
            "conditioning/cache_hits": self.cache.hits,
            "conditioning/cache_misses": self.cache.misses,
            "data/skipped_images": len(self.dataset.skipped),
            "data/epoch": self.dataset.epoch,
            **metrics,
            **{f"time/{k}": v for k, v in timer.times.items()},
            "time/step": total,
            "samples_per_s": len(pairs) / total,
        }

    # ------------------------------------------------------------------ evaluation and outputs
    def eval_pairs(self) -> list[TrainImage]:
        return [p for p in self.dataset.preview(self.config.pretrain.eval_images) if p.reference_caption]

    def ema_weights(self):
        """Context in which the trained parameters hold their EMA (no-op without one)."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    @torch.no_grad()
    def conditioning_losses(self, pairs: list[TrainImage]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample losses [EVAL_REPEATS · N] with each image's own caption and with the captions rotated by one
        among the images, from the same latents, noise and σ, with the EMA weights when kept."""
        cfg = self.config
        generator = torch.Generator().manual_seed(stable_seed(cfg.seed, 2**20))
        side = cfg.pretrain.resolution_at(max(self.step - 1, 0))
        latents = self.latents(pairs, side, generator).repeat(EVAL_REPEATS, 1, 1, 1)
        sigmas = self.sigmas(len(latents), generator)
        noise = torch.randn(latents.shape, generator=generator)
        captions = [p.reference_caption for p in pairs]
        shuffled = captions[1:] + captions[:1]
        with self.ema_weights():
            own = self.losses(latents, captions * EVAL_REPEATS, sigmas, noise)
            other = self.losses(latents, shuffled * EVAL_REPEATS, sigmas, noise)
        return own, other

    def evaluate(self) -> dict[str, float]:
        """The own-vs-shuffled caption losses; `eval/caption_gain_z` is their mean difference over its standard error
        (paired samples): about 0 for a decoder that ignores the captions, large for one that uses them."""
        pairs = self.eval_pairs()
        if len(pairs) < 2 or len({p.reference_caption for p in pairs}) < 2:
            return {}  # shuffling needs two different captions
        own, other = self.conditioning_losses(pairs)
        gain = other - own
        error = float(gain.std() / len(gain) ** 0.5)
        return {
            "eval/loss_own": float(own.mean()),
            "eval/loss_shuffled": float(other.mean()),
            "eval/caption_gain": float(gain.mean()),
            "eval/caption_gain_z": float(gain.mean()) / error if error > 0 else 0.0,
        }

    def finish(self, run_dir) -> None:
        """The final model holds the EMA weights when an EMA is kept."""
        with self.ema_weights():
            super().finish(run_dir)

    @torch.no_grad()
    def report_columns(self, images: list[TrainImage]) -> dict:
        """For the report: each image's own caption rendered by the trained decoder (adapters and EMA as saved)."""
        captions = [im.reference_caption or "" for im in images]
        seeds = [self.config.seed + i for i in range(len(images))]
        with caption_conditioning(self.uae, self.config.decoder):
            renders = self.uae.generate_tensors(
                captions, seed=seeds, steps=self.config.decoder.steps, guidance=self.config.decoder.guidance,
                size=self.config.pretrain.resolution_at(max(self.step - 1, 0)), allow_empty=True,
            )  # fmt: skip
        out = self.reward([im.pixels for im in images], renders, num_generations=1)
        return {"trained": (captions, renders, out.with_nan().tolist())}
