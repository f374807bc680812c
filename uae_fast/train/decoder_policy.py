"""The decoder as a trainable policy (stage 2b): LoRA on the DiT, the guided velocity field the SDE sampler and the
update share, caption conditioning computed once per caption and the negative prompt's once per run.

Also the one rule for how the decoder is conditioned on captions during training, used by both stages.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import ConfigError
from ..models.decoder import cfg_mix
from .config import DecoderConfig, LoraSettings, U4GSettings

__all__ = ["DecoderPolicy", "caption_conditioning", "dit_lora_config", "train_dit_lora"]


def caption_conditioning(uae, decoder: DecoderConfig):
    """Context in which training computes the decoder's caption conditioning.

    In `llm` mode the captions are encoded by the encoder's LLM; with `decoder.adapters_in_conditioning` off (the
    default) its LoRA adapters are disabled there, so the decoder sees the frozen base LLM whatever the captioner
    learns — a stationary environment for stage 2a, the same conditioning for stage 2b. With it on, the cached
    negative-prompt conditioning is dropped (it moves with the adapters) and recomputed on next use.
    """
    lora = uae.encoder.lora_model
    if decoder.conditioning == "llm" and not decoder.adapters_in_conditioning and lora is not None:
        return lora.disable_adapter()
    uae.clear_conditioning_cache()
    return contextlib.nullcontext()


class DecoderPolicy:
    """The UAE's decoder with trainable LoRA on its DiT.

    Args:
        uae: the loaded :class:`uae_fast.api.UAE`; its DiT gets new adapters (or, when the checkpoint has
            `dit_lora/`, that adapter is trained further, with its own rank and targets).
        decoder: rendering settings (size, CFG scale, conditioning mode).
        settings: the stage-2b settings (LoRA rank/alpha/targets).
    """

    def __init__(self, uae, decoder: DecoderConfig, settings: U4GSettings):
        self.uae = uae
        self.decoder = uae.decoder
        self.config = decoder
        self.negative = None
        train_dit_lora(self.decoder, settings.lora_targets, settings.lora, section="u4g")
        self.refresh_conditioning()

    # ------------------------------------------------------------------ adapters
    @property
    def peft_model(self):
        return self.decoder.lora_model

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.decoder.transformer.parameters() if p.requires_grad]

    def adapters_disabled(self):
        """Context in which the DiT is its base model: the reference policy."""
        return self.decoder.adapters_disabled()

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def condition(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embeds [B, L, D], mask [B, L], pooled [B, P]) of the captions, each computed once."""
        with caption_conditioning(self.uae, self.config):
            return self.uae.condition(captions)

    @torch.no_grad()
    def refresh_conditioning(self) -> None:
        """(Re)compute the negative prompt's conditioning: at start, and when the captioner's LLM changed."""
        self.negative = None
        if self.uses_cfg:
            with caption_conditioning(self.uae, self.config):
                self.uae.clear_conditioning_cache()
                self.negative = self.uae.negative_conditioning()

    def count_truncated(self, captions: list[str]) -> int:
        """Captions longer than the conditioning takes (text mode: T5's max_sequence_length; llm mode has no cap)."""
        encoders = self.decoder.text_encoders
        if self.config.conditioning != "text" or encoders is None or encoders.tokenizer_t5 is None:
            return 0
        ids = encoders.tokenizer_t5(captions, truncation=False).input_ids
        return sum(len(i) > encoders.max_sequence_length for i in ids)

    # ------------------------------------------------------------------ sampling
    def sigmas(self, steps: int) -> torch.Tensor:
        return self.decoder.sigmas(steps)

    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        """[B, C, h, w] fp32 latents: the trajectories are kept in fp32 (the SDE's log-probs are)."""
        return self.decoder.initial_noise(seeds, self.config.size, self.config.size).float()

    @property
    def uses_cfg(self) -> bool:
        return self.config.guidance > 1.0

    def velocity(self, latents: torch.Tensor, sigma, cond: tuple, uncond: torch.Tensor | None = None) -> torch.Tensor:
        """The CFG-guided velocity (grad through the conditional branch only, under autograd).

        `uncond`: the negative branch's velocity at these latents under the current weights, when already known (the
        rollout computed it and no optimizer step happened since): then only the conditional branch runs.
        """
        if uncond is None or not self.uses_cfg:
            return self.decoder.guided_velocity(
                latents, sigma, cond, guidance=self.config.guidance, negative=self.negative
            )
        return cfg_mix(uncond, self.decoder.velocity(latents, sigma, *cond), self.config.guidance)

    @torch.no_grad()
    def rollout_velocity(self, latents: torch.Tensor, sigma, cond: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(guided velocity, the negative branch's velocity or None without CFG), both branches in one batch."""
        if not self.uses_cfg:
            return self.decoder.velocity(latents, sigma, *cond), None
        uncond, cond_v = self.decoder.cfg_branches(latents, sigma, cond, self.negative)
        return cfg_mix(uncond, cond_v, self.config.guidance), uncond

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode_latents(latents)

    @torch.no_grad()
    def render(self, captions: list[str], seeds: list[int], *, steps: int, adapters: bool = True) -> torch.Tensor:
        """Deterministic (Euler) renders [B, 3, H, W] of the captions, with the trained adapters on or off."""
        cond = self.condition(captions)
        context = contextlib.nullcontext() if adapters else self.adapters_disabled()
        out = []
        with context:
            for i in range(0, len(captions), self.config.batch_size):
                part = slice(i, i + self.config.batch_size)
                out.append(
                    self.decoder.sample(
                        *(t[part] for t in cond),
                        self.initial_noise(seeds[part]),
                        steps=steps,
                        guidance=self.config.guidance,
                        negative=self.negative,
                    )
                )
        return torch.cat(out)


def train_dit_lora(decoder, suffixes: list[str], lora: LoraSettings, *, section: str) -> None:
    """Make the DiT's LoRA the only trainable part of `decoder`: the checkpoint's `dit_lora/` when it has one (trained
    further, with its own rank and targets), else new adapters on the modules ending with `suffixes`."""
    decoder.transformer.requires_grad_(False)
    if decoder.lora_model is not None:
        for name, param in decoder.lora_model.named_parameters():
            param.requires_grad_("lora_" in name)
    else:
        decoder.attach_lora(dit_lora_config(decoder.transformer, suffixes, lora, section=section))


def dit_lora_config(transformer, suffixes: list[str], lora: LoraSettings, *, section: str):
    """A `peft.LoraConfig` on the DiT's linear layers whose names end with one of `suffixes` (`section` names the
    config section in the error when none matches)."""
    from peft import LoraConfig

    names = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    targets = [n for n in names if any(n == t or n.endswith("." + t) for t in suffixes)]
    if not targets:
        raise ConfigError(f"{section}.lora_targets {suffixes} match no linear layer of the DiT")
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
