"""Public API: `uae = uae_fast.load("tiny")`, then `caption`, `generate`, `reconstruct`, `save_pretrained`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data.images import ImageSource, load_image
from .errors import CheckpointError, ConfigError, ImageLoadError
from .models.captioner import DEFAULT_CAPTION_BATCH, Captioner
from .models.components import (
    InferenceDefaults,
    UAEComponents,
    default_device,
    default_dtype,
    load_components,
    save_components,
)
from .models.decoder import UAEDecoder
from .models.encoder import CAPTION_PROMPT, NEGATIVE_PROMPT, conditioning_messages

__all__ = ["UAE", "InferenceDefaults", "Reconstruction", "load", "PRESETS"]

# Environment variable holding the local folder of the released UAE weights for the `uae-3b` preset.
UAE_3B_ENV = "UAE_FAST_UAE3B"


PRESETS = {
    "tiny": InferenceDefaults(max_new_tokens=24, steps=6, size=64),
    "uae-3b": InferenceDefaults(),
}


@dataclass
class Reconstruction:
    """Result of `UAE.reconstruct`: for B images and G captions each, image-major (index = b * G + g)."""

    captions: list[str]  # [B*G]
    images: list[Image.Image]  # [B*G]
    scores: list[float] | None = field(default=None)  # [B*G] rewards when reconstruct() was given a reward


class UAE:
    """A Unified Auto-Encoder: Qwen2.5-VL captioner (encoder) + SD3 decoder, for inference.

    Build with :func:`load`. All randomness is seeded per call, so equal arguments give equal outputs.

    Args:
        components: the modules (see :func:`uae_fast.models.components.load_components`).
        conditioning: `llm` (UAE) or `text` (vanilla SD3.5 text encoders).
        defaults: sampling defaults; None takes the ones stored with the components, else the official ones.
        caption_batch_size: the most sequences (images x generations) :meth:`caption` samples at once.
    """

    def __init__(
        self,
        components: UAEComponents,
        *,
        conditioning: str = "llm",
        defaults: InferenceDefaults | None = None,
        device=None,
        dtype=None,
        caption_batch_size: int = DEFAULT_CAPTION_BATCH,
    ):
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        self.components = components.to(device, dtype)
        self.conditioning = conditioning
        self.defaults = defaults or components.inference_defaults or InferenceDefaults()
        self.device, self.dtype = device, dtype
        self.encoder = components.encoder
        self.processor = components.processor
        self.processor.tokenizer.padding_side = "left"
        self.captioner = Captioner(self.encoder, self.processor, batch_size=caption_batch_size)
        pooled = components.compute_pooled_empty() if conditioning == "llm" else None
        self.decoder = UAEDecoder(
            components.transformer,
            components.vae,
            components.scheduler,
            conditioning,
            pooled_empty=pooled,
            text_encoders=components.text_encoders if conditioning == "text" else None,
        )
        self._negative = None
        self.caption_pooled_weight = components.caption_pooled_weight
        if self.caption_pooled_weight and conditioning == "llm" and pooled.shape[-1] != self.encoder.conditioning_dim:
            raise ConfigError(
                f"caption_pooled_weight needs the pooled width ({pooled.shape[-1]}) to equal the projector output "
                f"({self.encoder.conditioning_dim})"
            )

    # ---------------------------------------------------------------- encoder: image -> caption
    @torch.no_grad()
    def caption(
        self,
        images: Sequence[ImageSource] | ImageSource,
        *,
        num_generations: int = 1,
        temperature: float | None = None,
        top_p: float | None = None,
        max_new_tokens: int | None = None,
        seed: int = 0,
        prompt: str = CAPTION_PROMPT,
    ) -> list[str]:
        """Caption images. Returns B * num_generations captions, image-major (caption g of image b at b * G + g).

        Runs the one captioner (:class:`~uae_fast.models.captioner.Captioner`, the sampler training uses): each
        image is encoded and prefilled once for its G captions. `temperature` 0 means greedy decoding (G equal
        captions). `seed` seeds a generator on the model's device; the global RNG is untouched. Images are paths,
        bytes or PIL images; bad ones raise ImageLoadError.
        """
        if num_generations < 1:
            raise ConfigError(f"num_generations must be >= 1, got {num_generations}")
        images = _as_list(images)
        encoded = _encoded(images)
        if encoded is not None:
            try:
                return self._caption(encoded, num_generations, temperature, top_p, max_new_tokens, seed, prompt)
            except ImageLoadError:  # the streaming decoder says "image <i>": load each file to name the bad one
                for im in images:
                    load_image(im)
                raise
        pil = [load_image(im) for im in images]
        return self._caption(pil, num_generations, temperature, top_p, max_new_tokens, seed, prompt)

    def _caption(self, images, num_generations, temperature, top_p, max_new_tokens, seed, prompt) -> list[str]:
        d = self.defaults
        generator = torch.Generator(self.device).manual_seed(seed)
        return self.captioner.caption(
            images,
            num_generations,
            max_new_tokens=d.max_new_tokens if max_new_tokens is None else max_new_tokens,
            temperature=d.temperature if temperature is None else temperature,
            top_p=d.top_p if top_p is None else top_p,
            generator=generator,
            prompt=prompt,
        )

    # ---------------------------------------------------------------- decoder: caption -> image
    @torch.no_grad()
    def condition(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoder conditioning of captions: prompt_embeds [B, L, D], mask [B, L] (bool), pooled [B, P]."""
        if self.conditioning == "text":
            return self.decoder.encode_text(captions)
        return self.project_caption_states(*self.caption_states(captions))

    def caption_states(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """llm mode, the LLM half of :meth:`condition`: each caption templated as a "generate" message and run
        text-only through the encoder's language model. Returns last hidden states [B, L, H] and mask [B, L] (bool).

        Under autograd when the caller enables it; stage 1 caches these (the LLM is frozen there) and trains the
        projector on top with :meth:`project_caption_states`.
        """
        tokenizer = self.processor.tokenizer
        ids = [
            tokenizer.encode(
                self.processor.apply_chat_template(conditioning_messages(c), tokenize=False, add_generation_prompt=True)
            )
            for c in captions
        ]
        length = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), length), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.bool)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = True
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        return self.encoder.language_states(input_ids, mask.long()), mask

    def project_caption_states(
        self, hidden: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """llm mode, the projector half of :meth:`condition`: (prompt_embeds [B, L, D], mask, pooled [B, P])."""
        embeds = self.encoder.projector(hidden)
        pooled = self.decoder.pooled_empty.expand(len(hidden), -1)
        if self.caption_pooled_weight:
            mean = (embeds * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            pooled = pooled + self.caption_pooled_weight * mean.to(pooled.dtype)
        return embeds, mask, pooled

    def negative_conditioning(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Conditioning of the negative prompt (UAE's fixed text in llm mode, "" in text mode), computed once and
        cached (see :meth:`clear_conditioning_cache`)."""
        if self._negative is None:
            self._negative = self.condition([NEGATIVE_PROMPT if self.conditioning == "llm" else ""])
        return self._negative

    def clear_conditioning_cache(self) -> None:
        """Forget the cached negative-prompt conditioning, so the next CFG render recomputes it.

        In `llm` conditioning it is computed by the encoder's language model: call this whenever that model's
        output changes — its weights or LoRA adapters were updated, loaded, or enabled/disabled around a render
        (e.g. after each optimizer step when the trained adapters also encode the captions).
        """
        self._negative = None

    @torch.no_grad()
    def generate_tensors(
        self,
        captions: Sequence[str] | str,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        size: int | tuple[int, int] | None = None,
        seed: int | Sequence[int] = 0,
        allow_empty: bool = False,
    ) -> torch.Tensor:
        """Like :meth:`generate` but returns a float tensor [B, 3, H, W] in [0, 1] on the model's device."""
        captions = _as_list(captions)
        if not captions:
            raise ConfigError("generate needs at least one caption")
        for i, c in enumerate(captions):
            if not isinstance(c, str):
                raise ConfigError(f"caption {i} is a {type(c).__name__}, not a string")
            if not allow_empty and not c.strip():
                raise ConfigError(f"caption {i} is empty: the decoder needs text to condition on")
        d = self.defaults
        height, width = _size(d.size if size is None else size, self.decoder.vae_scale_factor)
        seeds = [seed + i for i in range(len(captions))] if isinstance(seed, int) else list(seed)
        if len(seeds) != len(captions):
            raise ConfigError(f"got {len(seeds)} seeds for {len(captions)} captions")
        guidance = d.guidance if guidance is None else guidance
        embeds, mask, pooled = self.condition(captions)
        return self.decoder.sample(
            embeds,
            mask,
            pooled,
            self.decoder.initial_noise(seeds, height, width),
            steps=d.steps if steps is None else steps,
            guidance=guidance,
            negative=self.negative_conditioning() if guidance > 1.0 else None,
        )

    def generate(self, captions: Sequence[str] | str, **kwargs) -> list[Image.Image]:
        """Render captions to PIL images. Sample i uses noise seed `seed + i` (or `seed[i]` for a list).

        Keyword args: steps, guidance (CFG scale; <= 1 disables CFG), size (int or (height, width), a multiple of
        the VAE factor), seed, allow_empty.
        """
        return tensors_to_pil(self.generate_tensors(captions, **kwargs))

    # ---------------------------------------------------------------- both
    def reconstruct(
        self,
        images: Sequence[ImageSource] | ImageSource,
        *,
        num_generations: int = 1,
        seed: int = 0,
        reward=None,
        **kwargs,
    ) -> Reconstruction:
        """image → caption(s) → image(s). Captions of one image share its noise seed, so they compare fairly.

        With a `reward` (a :class:`uae_fast.rewards.ReconstructionReward`) the reconstructions are scored on the
        device, without a PIL round trip; `scores` holds the rewards (NaN where a reward was invalid).
        kwargs go to :meth:`caption` (temperature, top_p, max_new_tokens) or :meth:`generate` (steps, guidance, size).
        """
        gen_keys = {"steps", "guidance", "size"}
        cap_kwargs = {k: v for k, v in kwargs.items() if k not in gen_keys}
        gen_kwargs = {k: v for k, v in kwargs.items() if k in gen_keys}
        pil = [load_image(im) for im in _as_list(images)]
        captions = self.caption(pil, num_generations=num_generations, seed=seed, **cap_kwargs)
        seeds = [seed + i // num_generations for i in range(len(captions))]
        # The model may legitimately say nothing; that caption is rendered rather than refused.
        recon = self.generate_tensors(captions, seed=seeds, allow_empty=True, **gen_kwargs)  # [B*G, 3, H, W]
        scores = None
        if reward is not None:
            out = reward(pil, recon, num_generations=num_generations)
            scores = out.with_nan().tolist()
        return Reconstruction(captions, tensors_to_pil(recon), scores)

    def save_pretrained(self, path: str | Path, *, write: bool = True) -> Path:
        """Write the released layout (llm/, SD3/, dit/, and llm_lora/ / dit_lora/ when adapters exist), plus
        `uae_fast.json` holding this model's :class:`InferenceDefaults` (restored by :func:`load`).

        In a distributed run every rank calls it (sharded weights are gathered) and only rank 0 has `write`."""
        # The decoder owns the transformer: training may have wrapped it with LoRA adapters since load.
        components = dataclasses.replace(self.components, transformer=self.decoder.transformer)
        return save_components(components, path, inference_defaults=self.defaults, write=write)


def load(
    name_or_path: str | os.PathLike,
    *,
    conditioning: str = "llm",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> UAE:
    """Load a UAE: a preset name (`tiny`, `uae-3b`) or a checkpoint folder in the released layout.

    `tiny` builds small random-weight components from `seed`. `uae-3b` reads the folder named by the
    UAE_FAST_UAE3B environment variable (nothing is ever downloaded). Missing paths raise CheckpointError.
    A checkpoint folder brings the inference defaults it was saved with (`uae_fast.json`); one without them (the
    released weights) gets the official :class:`InferenceDefaults`.
    """
    if conditioning not in ("llm", "text"):
        raise ConfigError(f"conditioning must be 'llm' or 'text', got {conditioning!r}")
    name = str(name_or_path)
    if name == "tiny":
        from .presets.tiny import build_tiny

        return UAE(build_tiny(seed), conditioning=conditioning, defaults=PRESETS["tiny"], device=device, dtype=dtype)
    if name == "uae-3b":
        folder = os.environ.get(UAE_3B_ENV)
        if not folder:
            raise CheckpointError(
                f"preset 'uae-3b' needs the released weights on disk: set {UAE_3B_ENV}=/path/to/UAE "
                "(a folder with llm/, llm_lora/, SD3/, dit/, dit_lora/)"
            )
        name = folder
    components = load_components(Path(name), conditioning=conditioning)
    return UAE(components, conditioning=conditioning, device=device, dtype=dtype)


def tensors_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] floats in [0, 1] → RGB PIL images (rounded, not truncated)."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def _encoded(images: list) -> list[bytes] | None:
    """The images as encoded files when every one is a path or bytes (the captioner then decodes and preprocesses
    them in one streaming pass), else None."""
    if not all(isinstance(im, (str, os.PathLike, bytes, bytearray)) for im in images):
        return None
    out = []
    for im in images:
        try:
            out.append(bytes(im) if isinstance(im, (bytes, bytearray)) else Path(im).read_bytes())
        except OSError as exc:
            raise ImageLoadError(f"{im}: cannot be read ({exc.strerror or exc})") from None
    return out


def _as_list(x) -> list:
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


def _size(size, factor: int) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else size
    if height <= 0 or width <= 0 or height % factor or width % factor:
        raise ConfigError(f"size must be positive multiples of {factor} (the VAE factor), got {height}x{width}")
    return int(height), int(width)
