"""Stage 2a, "generation for understanding": GRPO on the captioner, the frozen decoder as the reward environment.

One step: draw B images → sample G captions each (`rollout`) → render every caption with the frozen decoder, the G
captions of an image from the same initial noise (`reconstruct`) → reward = similarity of each reconstruction to
its source, group advantages (`score`) → fused-loss GRPO update of the LoRA adapters (`update`). The reference
policy is the base model with its adapters disabled; in `llm` conditioning the decoder also sees the base model
(by default), so the environment does not move while the policy learns.
"""

from __future__ import annotations

import contextlib
import statistics
import zlib
from dataclasses import dataclass

import torch

from ..errors import UAEError
from ..rl.grpo import GroupAdvantages, PackedCompletions, completion_logprobs, grpo_loss
from ..rl.rollout_buffer import RolloutBuffer
from .config import TrainConfig
from .data import ImageDataset, TrainImage
from .decoder_policy import caption_conditioning
from .loop import StageTrainer
from .policy import CaptionPolicy, Completions, ImageBatch
from .schedule import PhaseTimer, skip_updates
from .seeds import stable_seed

__all__ = ["RolloutBatch", "G4UTrainer"]


@dataclass
class RolloutBatch:
    """One rollout of B images x G captions, image-major (sample g of image b at b * G + g)."""

    images: list[TrainImage]  # B
    encoded: ImageBatch  # B prompts + vision features
    completions: Completions  # [B*G, T]
    captions: list[str]  # B*G
    noise_seeds: list[int]  # B*G, equal within a group
    reconstructions: torch.Tensor | None = None  # [B*G, 3, H, W] in [0, 1]
    rewards: torch.Tensor | None = None  # [B*G], NaN where invalid
    advantages: torch.Tensor | None = None  # [B*G]
    stats: GroupAdvantages | None = None


class G4UTrainer(StageTrainer):
    """GRPO on the encoder (recipe: setup → [rollout → reconstruct → score] x accumulation → update → save).

    Args:
        config: the run's :class:`TrainConfig`.
        uae: an already loaded :class:`uae_fast.api.UAE` to train (default: `uae_fast.load(config.model)`).
        dataset, reward: the image stream and the reward (default: new ones from the config); the unified
            schedule's two stages share them.
        steps: how many of the run's steps this stage trains (its LR schedule's length; default `max_steps`).
    """

    def __init__(self, config: TrainConfig, *, uae=None, dataset: ImageDataset | None = None, reward=None, steps=None):
        self.setup(config, uae=uae, dataset=dataset, reward=reward)
        cfg = config
        self.policy = CaptionPolicy(self.uae.encoder, self.uae.processor, cfg.lora)
        self.buffer = RolloutBuffer()
        if cfg.distributed.shard_frozen:  # every rank renders as many captions in the same chunks: in lockstep
            self.shard_frozen(self.uae.decoder.transformer, "the frozen DiT")
        self.images_per_rank = self.share(cfg.images_per_step, "batch_size / num_generations (images per step)")
        self.build_optimizer(
            [self.policy.encoder],
            learning_rate=cfg.learning_rate,
            updates=(cfg.max_steps if steps is None else steps) * cfg.num_iterations,
        )

    def adapters(self) -> dict:
        return {"llm_lora": self.policy.peft_model}

    # ------------------------------------------------------------------ phases
    @torch.no_grad()
    def rollout(self, images: list[TrainImage], chunk: int = 0) -> RolloutBatch:
        """Encode each image once and sample G captions per image (what one process would sample for them)."""
        cfg = self.config
        g = cfg.num_generations
        encoded = self.policy.encode_images([im.pixels for im in images])
        generator = torch.Generator(self.device).manual_seed(stable_seed(cfg.seed, self.step, chunk))
        where = self.batch_index(len(images))
        rows = torch.tensor([j * g + i for j in where for i in range(g)], device=self.device)
        completions = self.policy.sample(
            encoded,
            g,
            max_new_tokens=cfg.max_completion_length,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            generator=generator,
            share=(self.images_per_rank * self.runtime.world_size * g, rows) if self.runtime.distributed else None,
        )
        if cfg.decoder.fixed_noise:  # the same noise for an image at every step: a deterministic environment
            seeds = [stable_seed(cfg.seed, zlib.crc32(im.key.encode())) for im in images]
        else:
            seeds = [stable_seed(cfg.seed, self.step, chunk, j) for j in where]
        return RolloutBatch(
            images, encoded, completions, self.policy.decode(completions), [s for s in seeds for _ in range(g)]
        )

    @torch.no_grad()
    def reconstruct(self, batch: RolloutBatch) -> None:
        """Render every caption; the G captions of an image share its initial noise."""
        d = self.config.decoder
        images = []
        with caption_conditioning(self.uae, self.config.decoder):
            for i in range(0, len(batch.captions), d.batch_size):
                images.append(
                    self.uae.generate_tensors(
                        batch.captions[i : i + d.batch_size],
                        seed=batch.noise_seeds[i : i + d.batch_size],
                        steps=d.steps,
                        guidance=d.guidance,
                        size=d.size,
                        allow_empty=True,  # the policy may say nothing; that earns its (low) reward
                    )
                )
        batch.reconstructions = torch.cat(images)

    @torch.no_grad()
    def score(self, batch: RolloutBatch) -> None:
        """Rewards (NaN where invalid: left out of the group statistics, advantage 0) and group advantages."""
        cfg = self.config
        out = self.reward(
            [im.pixels for im in batch.images],
            batch.reconstructions,
            source_ids=[im.key for im in batch.images],
            num_generations=cfg.num_generations,
        )
        batch.rewards = out.with_nan()
        batch.stats = self.group_advantages(batch.rewards, cfg.num_generations, cfg.loss.scale_rewards)
        sign = -1.0 if cfg.negate_advantages else 1.0
        batch.advantages = sign * batch.stats.advantages

    def update(self, batches: list[RolloutBatch]) -> dict[str, float]:
        """`num_iterations` optimizer steps on the rollouts, each accumulating gradients over packed micro-batches."""
        cfg = self.config
        encoded = ImageBatch.concat([b.encoded for b in batches])
        buf = self._store(batches)
        rows = buf.prompt_id.tolist()
        completions = [torch.from_numpy(buf.sequence(i)).to(self.device) for i in range(len(buf))]
        advantages = torch.from_numpy(buf.advantage.copy()).to(self.device)
        # A zero advantage contributes nothing but its KL and entropy terms: skip those sequences when both are off.
        include = (buf.advantage != 0) | (cfg.loss.beta > 0) | (cfg.loss.entropy_coef > 0)
        # The loss is normalised by the whole batch's counts (every rank's): N ranks step as one process would.
        total_seqs, total_tokens, included = self.runtime.sum(len(completions), buf.num_tokens, int(include.sum()))
        metrics: dict[str, list] = {}
        if not included:  # no learning signal: no update, but the schedule still advances as planned
            skip_updates(self.scheduler, cfg.num_iterations)
            return {"loss": 0.0, "grad_norm": 0.0, "update/sequences": 0}
        # Whole groups per micro-batch, first-fit decreasing under `micro_batch_tokens`, each group's prompt charged
        # once (it is forwarded once and shared by the group's completions); a group over the budget goes alone.
        packed = buf.pack(
            cfg.micro_batch_tokens,
            keep_groups=True,
            shared_prefix=[len(encoded.prompt_ids[row]) for row in rows],
            oversize="own_batch",
            include=include,
        )
        micro = [mb.sample_index.tolist() for mb in packed.batches]
        token_index = [mb.token_index.numpy() for mb in packed.batches]

        def hidden_of(index: list[int]):
            return self.policy.completion_hidden(encoded, [rows[i] for i in index], [completions[i] for i in index])

        def logprobs_into(field, k: int) -> None:  # no-grad pass of micro-batch k, stored per token in the buffer
            hidden, tokens, _ = hidden_of(micro[k])
            logp = completion_logprobs(hidden, self.policy.encoder.lm_head.weight, tokens, cfg.loss)[0]
            field[token_index[k]] = logp.float().cpu().numpy()

        with torch.no_grad(), self.engine.gathered():
            if cfg.loss.beta > 0:
                with self.policy.adapters_disabled():
                    for k in range(len(micro)):
                        logprobs_into(buf.ref_logprob, k)
            if cfg.num_iterations > 1:  # on-policy otherwise: the ratio is exactly 1 and needs no old pass
                for k in range(len(micro)):
                    logprobs_into(buf.old_logprob, k)

        def per_token(field, k: int) -> torch.Tensor:
            return torch.from_numpy(field[token_index[k]]).to(self.device)

        # Engines in lockstep need as many passes on every rank: a rank with fewer repeats its first, weighted 0.
        passes = self.engine.passes(len(micro))
        lm_head = self.policy.encoder.lm_head.weight
        batch_losses = []
        for _ in range(cfg.num_iterations):
            batch_loss = 0.0  # the whole batch's loss: the scaled micro-batch losses add up to it
            for k in range(passes):
                # the fused loss reads the LM head's weight outside its forward: zero3 gathers it for the pass
                with self.engine.direct_use([lm_head]):
                    if k >= len(micro):
                        self.backward(hidden_of(micro[0] if micro else [0])[0].sum() * 0.0, last=k == passes - 1)
                        continue
                    index = micro[k]
                    hidden, tokens, seq = hidden_of(index)
                    batch = PackedCompletions(
                        tokens,
                        seq,
                        len(index),
                        old_logp=per_token(buf.old_logprob, k) if cfg.num_iterations > 1 else None,
                        ref_logp=per_token(buf.ref_logprob, k) if cfg.loss.beta > 0 else None,
                    )
                    loss, _, m = grpo_loss(hidden, lm_head, batch, advantages[index], cfg.loss, total_tokens)
                    if not torch.isfinite(loss):
                        raise UAEError(
                            f"step {self.step + 1}: the loss is {float(loss)}; the model diverged (non-finite rewards "
                            "are masked out) — lower learning_rate"
                        )
                    scaled = loss * self._micro_scale(len(index), len(tokens), total_seqs, total_tokens)
                    self.backward(scaled, last=k == passes - 1)
                    batch_loss += float(scaled.detach())
                    for key, value in m.items():
                        metrics.setdefault(key, []).append((float(value), len(tokens)))
            batch_losses.append(self.runtime.sum(batch_loss)[0])
            norm = self.optimizer_step()
        out = {k: sum(v * w for v, w in vals) / max(sum(w for _, w in vals), 1) for k, vals in metrics.items()}
        out["loss"] = sum(batch_losses) / len(batch_losses)
        out["grad_norm"] = norm
        out["update/sequences"] = int(include.sum())
        return out

    def _store(self, batches: list[RolloutBatch]) -> RolloutBuffer:
        """The step's rollouts, all accumulation chunks, in the C++ rollout store: per completion its image (prompt
        and group id), tokens, reward, advantage and truncation flag; per token the reference and old log-probs,
        filled by the no-grad passes. (The image prompts stay in `ImageBatch`: they are shared, not per sample.)"""
        buf = self.buffer
        buf.clear()
        first_image = 0
        for b in batches:
            g, n = b.completions.num_generations, len(b.captions)
            image = torch.arange(first_image, first_image + len(b.images)).repeat_interleave(g)
            buf.add_batch(
                image,
                image,
                b.completions.lengths,
                torch.cat([b.completions.token_list(i) for i in range(n)]),
                rewards=b.rewards,
                truncated=b.completions.truncated,
            )
            first_image += len(b.images)
        buf.advantage[:] = torch.cat([b.advantages for b in batches]).cpu().numpy()
        return buf

    def _micro_scale(self, seqs: int, tokens: int, total_seqs: int, total_tokens: int) -> float:
        """Factor making the sum of micro-batch losses the loss of the whole batch, for every loss type."""
        loss_type = self.config.loss.loss_type
        if loss_type in ("grpo", "dr_grpo"):  # means over sequences
            return seqs / total_seqs
        if loss_type == "bnpo":  # mean over the micro-batch's tokens
            return tokens / max(total_tokens, 1)
        return 1.0  # dapo: already divided by the whole batch's token count

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        """One rollout batch (x gradient_accumulation_steps) and its update. Returns the step's metrics."""
        cfg = self.config
        timer = PhaseTimer(self.device)
        batches = []
        for chunk in range(cfg.gradient_accumulation_steps):
            images = self.dataset.next_batch(self.images_per_rank)
            with timer("rollout"), self.engine.gathered():
                batch = self.rollout(images, chunk)
            with timer("reconstruct"):
                self.reconstruct(batch)
            with timer("score"):
                self.score(batch)
            batches.append(batch)
        with timer("update"):
            update_metrics = self.update(batches)
        self.step += 1
        return {**self._rollout_metrics(batches), **update_metrics, **self._throughput(batches, timer.times)}

    def _rollout_metrics(self, batches: list[RolloutBatch]) -> dict[str, float]:
        rewards = torch.cat([b.rewards for b in batches])
        valid = rewards[torch.isfinite(rewards)]
        stds = torch.cat([b.stats.group_std for b in batches])
        lengths = torch.cat([b.completions.lengths for b in batches]).float()
        truncated = torch.cat([b.completions.truncated for b in batches]).float()
        groups = sum(b.stats.group_std.numel() for b in batches)
        out = {
            "reward": float(valid.mean()) if valid.numel() else float("nan"),
            "reward_std": float(stds.mean()),
            "frac_reward_zero_std": sum(b.stats.num_zero_std_groups for b in batches) / groups,
            "reward/invalid": sum(b.stats.num_invalid_rewards for b in batches),
            "completions/mean_length": float(lengths.mean()),
            "completions/median_length": float(lengths.median()),
            "completions/clipped_ratio": float(truncated.mean()),
            "learning_rate": self.scheduler.get_last_lr()[0],
            "data/skipped_images": len(self.dataset.skipped),
            "data/epoch": self.dataset.epoch,
        }
        refs = [im.reference_caption for b in batches for im in b.images if im.reference_caption is not None]
        if refs:  # the paper's "aha moment": captions grow towards (and past) the reference captions' length
            tok = self.policy.tokenizer
            out["completions/reference_mean_length"] = statistics.mean(len(tok(r).input_ids) for r in refs)
        return out

    def _throughput(self, batches: list[RolloutBatch], times: dict[str, float]) -> dict[str, float]:
        images = sum(len(b.images) for b in batches)
        samples = sum(len(b.captions) for b in batches)
        tokens = sum(int(b.completions.lengths.sum()) for b in batches)
        out = {f"time/{k}": v for k, v in times.items()}
        out["time/step"] = sum(times.values())
        out["rollout/tokens_per_s"] = tokens / times["rollout"]
        out["rollout/images_per_s"] = images / times["rollout"]
        out["reconstruct/images_per_s"] = samples / times["reconstruct"]
        out["score/images_per_s"] = samples / times["score"]
        out["update/tokens_per_s"] = tokens * self.config.num_iterations / times["update"]
        out["samples_per_s"] = samples / out["time/step"]
        return out

    # ------------------------------------------------------------------ outputs
    @torch.no_grad()
    def report_columns(self, images: list[TrainImage]) -> dict[str, tuple[list[str], torch.Tensor, list[float]]]:
        """For the report: greedy captions of the base encoder (adapters off) and the trained one, each rendered by
        the frozen decoder from the same noise, and scored."""
        cfg = self.config
        columns = {}
        for label, context in (("base", self.policy.adapters_disabled()), ("trained", contextlib.nullcontext())):
            with context:
                encoded = self.policy.encode_images([im.pixels for im in images])
                completions = self.policy.sample(encoded, 1, max_new_tokens=cfg.max_completion_length, temperature=0)
                seeds = [cfg.seed + i for i in range(len(images))]
                batch = RolloutBatch(images, encoded, completions, self.policy.decode(completions), seeds)
                self.reconstruct(batch)
            out = self.reward([im.pixels for im in images], batch.reconstructions, num_generations=1)
            scores = out.with_nan().tolist()
            columns[label] = (batch.captions, batch.reconstructions, scores)
        return columns
