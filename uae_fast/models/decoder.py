"""The UAE decoder: SD3/SD3.5 MM-DiT + VAE + flow-matching Euler sampler, conditioned on captions.

Two conditioning modes:
- `llm` (official UAE): `prompt_embeds` come from the encoder's projector (see `UAEEncoder.project`);
  `pooled_prompt_embeds` is SD3's pooled CLIP embedding of "" — computed once at load, after which the CLIP text
  encoders are dropped (the T5-XXL encoder is never loaded in this mode).
- `text` (vanilla SD3.5 baseline): CLIP-L + CLIP-G + T5 encode the caption exactly as diffusers' pipeline does.

The sampler is our own Euler loop (not the diffusers pipeline) because the RL stages need its internals and because it
takes a text padding mask, so captions of different lengths batch together without changing each other's images.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .attention import use_masked_joint_attention

__all__ = ["TextEncoders", "UAEDecoder", "cfg_mix", "clip_pooled_embeds", "ode_step", "pad_and_stack"]


@dataclass
class TextEncoders:
    """SD3's three text encoders and their tokenizers (T5 may be None: SD3 then uses zeros for its part)."""

    clip_l: nn.Module
    clip_g: nn.Module
    t5: nn.Module | None
    tokenizer_l: object
    tokenizer_g: object
    tokenizer_t5: object | None
    max_sequence_length: int = 256


@torch.no_grad()
def clip_pooled_embeds(encoders: TextEncoders, texts: list[str]) -> torch.Tensor:
    """SD3's pooled projection: CLIP-L and CLIP-G `text_embeds` of the texts, concatenated. Returns [B, P]."""
    pooled = []
    for tokenizer, model in ((encoders.tokenizer_l, encoders.clip_l), (encoders.tokenizer_g, encoders.clip_g)):
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
        ids = torch.as_tensor(ids.input_ids, device=model.device)
        pooled.append(model(ids, output_hidden_states=False).text_embeds)
    return torch.cat(pooled, dim=-1)


def pad_and_stack(embeds: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad [B_i, L_i, D] embeddings (and [B_i, L_i] masks) to a common length and concatenate on batch."""
    length = max(e.shape[1] for e in embeds)
    out_e, out_m = [], []
    for e, m in zip(embeds, masks):
        pad = length - e.shape[1]
        out_e.append(nn.functional.pad(e, (0, 0, 0, pad)))
        out_m.append(nn.functional.pad(m.bool(), (0, pad), value=False))
    return torch.cat(out_e), torch.cat(out_m)


def ode_step(latents: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """The deterministic Euler step x + (σ' − σ)·v, in fp32 (fp64 latents stay fp64): the latent update is the one
    place where bf16 rounding would accumulate over steps. Returns the latents in their input dtype."""
    dtype = torch.promote_types(latents.dtype, torch.float32)
    return (latents.to(dtype) + (sigma_next - sigma) * velocity.to(dtype)).to(latents.dtype)


def cfg_mix(uncond: torch.Tensor, cond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance: `uncond + guidance · (cond − uncond)`."""
    return uncond + guidance * (cond - uncond)


class UAEDecoder(nn.Module):
    """SD3 transformer + VAE + flow-matching scheduler, with a masked-attention Euler sampler.

    Args:
        transformer: `SD3Transformer2DModel` (optionally PEFT-wrapped).
        vae: SD3 `AutoencoderKL` (16 latent channels).
        scheduler: `FlowMatchEulerDiscreteScheduler`; only its sigma schedule is used.
        conditioning: "llm" or "text".
        pooled_empty: [1, P] pooled CLIP embedding of "" (llm mode).
        text_encoders: required in text mode.
    """

    def __init__(self, transformer, vae, scheduler, conditioning: str, pooled_empty=None, text_encoders=None):
        super().__init__()
        if conditioning not in ("llm", "text"):
            raise ValueError(f"conditioning must be 'llm' or 'text', got {conditioning!r}")
        if conditioning == "text" and text_encoders is None:
            raise ValueError("text conditioning needs the SD3 text encoders")
        if conditioning == "llm" and pooled_empty is None:
            raise ValueError("llm conditioning needs the pooled embedding of the empty prompt")
        self.transformer = transformer
        self.vae = vae
        self.scheduler = scheduler
        self.conditioning = conditioning
        self.text_encoders = text_encoders
        self.register_buffer("pooled_empty", pooled_empty, persistent=False)
        use_masked_joint_attention(self._base_transformer)

    @property
    def _base_transformer(self):
        """The SD3 transformer under any PEFT wrapper (set_attn_processor lives there)."""
        model = self.transformer
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self._base_transformer.config.in_channels

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Vanilla SD3 text conditioning. Returns prompt_embeds [B, L, D], mask [B, L] (all real), pooled [B, P]."""
        from diffusers import StableDiffusion3Pipeline

        enc = self.text_encoders
        # diffusers' own encode_prompt is the reference for vanilla SD3; reuse it rather than re-derive it.
        pipe = StableDiffusion3Pipeline(
            transformer=self._base_transformer,
            scheduler=self.scheduler,
            vae=self.vae,
            text_encoder=enc.clip_l,
            tokenizer=enc.tokenizer_l,
            text_encoder_2=enc.clip_g,
            tokenizer_2=enc.tokenizer_g,
            text_encoder_3=enc.t5,
            tokenizer_3=enc.tokenizer_t5,
        )
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=texts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=enc.max_sequence_length,
        )
        return embeds, torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device), pooled

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def initial_noise(self, seeds: list[int], height: int, width: int) -> torch.Tensor:
        """[B, C, h, w] Gaussian latents, one CPU generator per seed so each sample's noise is batch-independent."""
        f = self.vae_scale_factor
        shape = (self.latent_channels, height // f, width // f)
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(noise).to(self.device, self.dtype)

    def sigmas(self, steps: int) -> torch.Tensor:
        """The scheduler's shifted sigma schedule, [steps + 1] from ~1 down to 0."""
        self.scheduler.set_timesteps(steps, device="cpu")
        return self.scheduler.sigmas.to(torch.float32)

    # ------------------------------------------------------------------ LoRA adapters (stage 2b)
    @property
    def lora_model(self):
        """The PEFT model wrapping the transformer when it carries adapters (a checkpoint's `dit_lora/`, or ones
        attached for training), else None. Its `disable_adapter()` context gives the base DiT."""
        model = self.transformer
        return model if hasattr(model, "peft_config") and hasattr(model, "disable_adapter") else None

    def attach_lora(self, config):
        """Wrap the transformer with new LoRA adapters (a `peft.LoraConfig`; targets relative to the DiT).

        Returns the `PeftModel`, now `self.transformer`. Raises ConfigError if adapters are already attached.
        """
        from peft import get_peft_model

        from ..errors import ConfigError

        if self.lora_model is not None:
            raise ConfigError("the DiT already carries LoRA adapters; attach_lora adds the first set only")
        self.transformer = get_peft_model(self.transformer, config)
        return self.transformer

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each DiT block in the backward instead of keeping its activations (training memory)."""
        self._base_transformer.enable_gradient_checkpointing()

    def adapters_disabled(self):
        """Context in which the DiT is its base model (the stage-2b reference policy)."""
        peft = self.lora_model
        return peft.disable_adapter() if peft is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ the velocity field and sampling
    def velocity(self, latents, sigma, prompt_embeds, prompt_mask, pooled) -> torch.Tensor:
        """One transformer forward: the predicted velocity [B, C, h, w] at noise level `sigma` (a float32 scalar).

        A padding mask is passed only when some caption is padded (the unmasked path is the stock attention).
        """
        t = (sigma * self.scheduler.config.num_train_timesteps).to(self.device)  # fp32, as diffusers passes it
        kwargs = {"attention_mask": prompt_mask} if not bool(prompt_mask.all()) else None
        return self.transformer(
            hidden_states=latents.to(self.dtype),
            timestep=t.expand(latents.shape[0]),
            encoder_hidden_states=prompt_embeds.to(self.dtype),
            pooled_projections=pooled.to(self.dtype),
            joint_attention_kwargs=kwargs,
            return_dict=False,
        )[0]

    def guided_velocity(self, latents, sigma, cond: tuple, *, guidance: float, negative: tuple | None = None):
        """Classifier-free guided velocity `uncond + guidance · (cond − uncond)`; guidance <= 1 is the plain
        conditional velocity.

        Args:
            cond: (prompt_embeds [B, L, D], mask [B, L] bool, pooled [B, P]).
            negative: the negative prompt's (embeds [1, Ln, D], mask [1, Ln], pooled [1, P]); needed if guidance > 1.
        """
        if guidance <= 1.0:
            return self.velocity(latents, sigma, *cond)
        return cfg_mix(*self.cfg_branches(latents, sigma, cond, negative), guidance)

    def cfg_branches(self, latents, sigma, cond: tuple, negative: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(negative-prompt velocity, conditional velocity) for CFG.

        Without autograd (sampling, rollouts) both branches run as one batch. Under autograd (the stage-2b update)
        the negative branch runs without grad: it is never kept for backward, which halves the activations held.
        """
        if negative is None:
            raise ValueError("guidance > 1 needs the negative prompt conditioning")
        batch = latents.shape[0]
        neg_e, neg_m, neg_p = negative
        neg = (neg_e.expand(batch, -1, -1), neg_m.expand(batch, -1), neg_p.expand(batch, -1))
        if torch.is_grad_enabled():
            with torch.no_grad():
                uncond = self.velocity(latents, sigma, *neg)
            return uncond, self.velocity(latents, sigma, *cond)
        embeds, mask = pad_and_stack([neg[0], cond[0]], [neg[1], cond[1]])
        pooled = torch.cat([neg[2], cond[2]])
        uncond, cond_v = self.velocity(torch.cat([latents, latents]), sigma, embeds, mask, pooled).chunk(2)
        return uncond, cond_v

    @torch.no_grad()
    def sample(
        self,
        prompt_embeds: torch.Tensor,
        prompt_mask: torch.Tensor,
        pooled: torch.Tensor,
        noise: torch.Tensor,
        *,
        steps: int,
        guidance: float,
        negative: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Euler flow-matching sampling with optional classifier-free guidance.

        Args:
            prompt_embeds: [B, L, D]; prompt_mask: [B, L] bool; pooled: [B, P]; noise: [B, C, h, w].
            negative: (embeds [1, Ln, D], mask [1, Ln], pooled [1, P]) of the negative prompt; needed if guidance > 1.

        Returns:
            Images [B, 3, H, W] in [0, 1], float32.
        """
        cond = (prompt_embeds, prompt_mask, pooled)
        latents = noise.to(self.dtype)
        sigmas = self.sigmas(steps)
        for i in range(steps):
            velocity = self.guided_velocity(latents, sigmas[i], cond, guidance=guidance, negative=negative)
            latents = ode_step(latents, velocity, sigmas[i], sigmas[i + 1])
        return self.decode_latents(latents)

    @torch.no_grad()
    def encode_images(
        self, images: torch.Tensor, generator: torch.Generator | None = None, *, share: tuple[int, list] | None = None
    ) -> torch.Tensor:
        """VAE encode with SD3's scaling/shift (the inverse of :meth:`decode_latents`): images [B, 3, H, W] in [0, 1]
        → latents [B, C, H/8, W/8] in the DiT's dtype, sampled from the VAE's posterior with `generator`.

        `share`: (M, index [B]): these images are images `index` of a batch of M (one rank's part of a distributed
        batch); the posterior noise is drawn for all M and these take theirs, as one process would draw it."""
        cfg = self.vae.config
        posterior = self.vae.encode(images.to(self.device, self.dtype) * 2 - 1).latent_dist
        mean, std = posterior.mean, posterior.std
        count = len(mean) if share is None else share[0]
        noise = torch.randn((count, *mean.shape[1:]), generator=generator, device=generator.device if generator
                            else mean.device, dtype=mean.dtype)  # fmt: skip
        noise = noise if share is None else noise[share[1]]
        latents = mean + std * noise.to(mean.device)
        return (latents - cfg.shift_factor) * cfg.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode with SD3's scaling/shift. Returns [B, 3, H, W] float32 in [0, 1].

        Under autograd when the caller enables it (the cold start backpropagates through it); the samplers call it
        under no_grad."""
        cfg = self.vae.config
        latents = latents / cfg.scaling_factor + cfg.shift_factor
        image = self.vae.decode(latents.to(self.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)
