"""The one captioner: image → G captions with a KV-cached sampler. The API (`UAE.caption`), Unified-Bench, the CLI
and the stage-2a trainer (through its subclass `uae_fast.train.policy.CaptionPolicy`) all sample through it.

Why not `generate()`: `generate(num_return_sequences=G)` repeats every image G times through the vision tower and
the prompt prefill. Here each image is preprocessed (C++ `qwen_preprocess`, equal to the processor's output), run
through the ViT and prefilled **once**; its prefix KV cache is shared, not copied, by its G rows in a pre-allocated
static cache (`kv_cache.PrefixSharedKVCache`), and the captions are sampled token by token on the device
(`sampling.sample_tokens`: inverse-CDF sampling, vision and chat special tokens masked, finished rows dropped, a
CUDA graph per step on GPUs). Greedy decoding equals transformers' `generate` (tested); sampling draws from the same
distribution as its temperature / top-p warpers (tested), and a seed gives the tokens of the DynamicCache loop this
replaced (tested).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..data.preprocess import qwen_preprocess, qwen_preprocess_bytes
from ..errors import ConfigError
from .encoder import CAPTION_PROMPT, caption_messages, special_token_ids_to_suppress
from .kv_cache import PrefixSharedKVCache, check_decoder
from .sampling import sample_token, sample_tokens

__all__ = ["Captioner", "ImageBatch", "Completions", "DEFAULT_CAPTION_BATCH", "sample_token"]

# Sequences sampled at once by `Captioner.caption` (its KV cache grows with rows x tokens); callers of `sample`
# choose their own batch.
DEFAULT_CAPTION_BATCH = 64


@dataclass
class ImageBatch:
    """B images, preprocessed and encoded once; each is the prompt of a group of G completions."""

    prompt_ids: list[torch.Tensor]  # B x [P_b] prompt tokens (image pads expanded)
    grid_thw: torch.Tensor  # [B, 3]
    features: list[torch.Tensor]  # B x [P_img_b, H] vision features (no grad)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @classmethod
    def concat(cls, batches: list[ImageBatch]) -> ImageBatch:
        if len(batches) == 1:
            return batches[0]
        return cls(
            [p for b in batches for p in b.prompt_ids],
            torch.cat([b.grid_thw for b in batches]),
            [f for b in batches for f in b.features],
        )


@dataclass
class Completions:
    """Sampled captions of B images x G, image-major (completion g of image b at b * G + g)."""

    tokens: torch.Tensor  # [B*G, T] right-padded with pad ids; includes the end token when one was sampled
    lengths: torch.Tensor  # [B*G] tokens per completion (>= 1)
    truncated: torch.Tensor  # [B*G] bool: no end token within max_new_tokens
    num_generations: int

    def token_list(self, index: int) -> torch.Tensor:
        return self.tokens[index, : int(self.lengths[index])]


class Captioner:
    """A `UAEEncoder` + its processor as a caption sampler (inference only; no gradients).

    Args:
        encoder: the `UAEEncoder` (its `.model` may carry LoRA adapters; they are used as they are).
        processor: its `Qwen2_5_VLProcessor` (tokenizer, chat template, image sizes).
        prompt: the caption instruction (the official one by default).
        batch_size: the most sequences (images x generations) `caption` samples at once, and the most images per
            vision-tower pass in `encode_images`; bounds memory, not results' meaning.
    """

    def __init__(
        self, encoder, processor, *, prompt: str = CAPTION_PROMPT, batch_size: int = DEFAULT_CAPTION_BATCH
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.encoder, self.processor = encoder, processor
        self.tokenizer = processor.tokenizer
        self.batch_size = batch_size
        self.image_token_id = encoder.config.image_token_id
        self.eos_ids = _as_list(encoder.generation_config.eos_token_id)
        self.pad_id = self.tokenizer.pad_token_id
        vocab = encoder.lm_head.weight.shape[0]
        banned = special_token_ids_to_suppress(self.tokenizer, keep=self.eos_ids)
        self.banned = torch.zeros(vocab, dtype=torch.bool)  # [V]
        self.banned[[i for i in banned if i < vocab]] = True
        self.banned[len(self.tokenizer) :] = True  # rows past the tokenizer (Qwen pads its vocab) decode to nothing
        self.prompt = prompt
        self._prompt_parts: dict[str, tuple[list[int], list[int]]] = {}
        self.images_encoded = 0  # vision-tower passes, per image (tests check: once per group)
        self.cuda_graphs = True  # on CUDA, replay the decode step as a CUDA graph
        self.cuda_dtype = torch.bfloat16  # on CUDA, autocast an fp32 model's rollout to this dtype (None: off)
        check_decoder(self.vl.language_model)

    @property
    def vl(self):
        """The `Qwen2_5_VLModel` (under PEFT's wrapper when adapters are attached; LoRA layers are injected in it)."""
        model = self.encoder.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @property
    def device(self) -> torch.device:
        return self.encoder.lm_head.weight.device

    def split_prompt(self, prompt: str | None = None) -> tuple[list[int], list[int]]:
        """Token ids of the templated caption prompt before and after its single image placeholder."""
        prompt = self.prompt if prompt is None else prompt
        if prompt not in self._prompt_parts:
            text = self.processor.apply_chat_template(
                caption_messages(prompt), tokenize=False, add_generation_prompt=True
            )
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
            where = [i for i, t in enumerate(ids) if t == self.image_token_id]
            if len(where) != 1:
                raise ConfigError(f"the caption prompt template must hold one image placeholder, found {len(where)}")
            self._prompt_parts[prompt] = (ids[: where[0]], ids[where[0] + 1 :])
        return self._prompt_parts[prompt]

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def encode_images(
        self, images: Sequence[np.ndarray | Image.Image] | Sequence[bytes], *, prompt: str | None = None
    ) -> ImageBatch:
        """C++ preprocessing + one vision-tower pass per image. Equal to the processor's inputs (tested).

        Args:
            images: decoded RGB images — uint8 arrays [H, W, 3] (the trainer's, decoded once for the policy and the
                reward) or PIL images (converted to RGB) — or encoded files (all `bytes`): those take the streaming
                path (`qwen_preprocess_bytes`: each image resized right after it is decoded, while it is in cache;
                nothing else needs their pixels).
            prompt: caption instruction (default: the captioner's).
        """
        if not images:
            raise ConfigError("encode_images needs at least one image")
        ip = self.processor.image_processor
        options = {
            "min_pixels": ip.size["shortest_edge"],
            "max_pixels": ip.size["longest_edge"],
            "patch_size": ip.patch_size,
            "merge_size": ip.merge_size,
            "temporal_patch_size": ip.temporal_patch_size,
            "image_mean": ip.image_mean,
            "image_std": ip.image_std,
        }
        if all(isinstance(im, (bytes, bytearray)) for im in images):
            inputs = qwen_preprocess_bytes(list(images), **options)
        else:
            inputs = qwen_preprocess([_as_rgb_array(im, i) for i, im in enumerate(images)], **options)
        grid = inputs["image_grid_thw"].to(self.device)  # [B, 3]
        pixels = inputs["pixel_values"].to(self.device, self.encoder.dtype)  # [Σ patches, C*T*P*P]
        features, start = [], 0
        for lo in range(0, len(images), self.batch_size):  # bounded vision-tower batches
            chunk = grid[lo : lo + self.batch_size]
            stop = start + int(chunk.prod(-1).sum())
            out = self.vl.get_image_features(pixels[start:stop], chunk, return_dict=True).pooler_output
            features += list(out)
            start = stop
        self.images_encoded += len(images)
        before, after = self.split_prompt(prompt)
        merge = ip.merge_size**2
        prompt_ids = [
            torch.tensor(before + [self.image_token_id] * (int(g.prod()) // merge) + after, device=self.device)
            for g in grid
        ]
        return ImageBatch(prompt_ids, grid, features)

    # ------------------------------------------------------------------ forward
    def prompt_inputs(self, images: ImageBatch, rows: list[int]):
        """Right-padded embeddings (image features scattered in) [R, P, H], mask [R, P] and 3-D rope positions
        [3, R, P] of the prompts of images `rows`."""
        seqs = [images.prompt_ids[b] for b in rows]
        ids = torch.full((len(seqs), max(len(s) for s in seqs)), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
        is_image = ids == self.image_token_id
        positions, _ = self.vl.get_rope_index(
            ids, mm_token_type_ids=is_image.int(), image_grid_thw=images.grid_thw[rows], attention_mask=mask
        )
        embeds = self.vl.get_input_embeddings()(ids)
        features = torch.cat([images.features[b] for b in rows]).to(embeds.dtype)
        return embeds.masked_scatter(is_image[..., None], features), mask, positions

    def prefill(self, images: ImageBatch, rows: list[int]):
        """Forward of the prompts of `rows` (right-padded, with a KV cache): the shared prefix of their groups.

        Returns (cache, hidden of each prompt's last position [R, H], prompt mask [R, P], next mrope position [R]).
        Differentiable when called with grad enabled (the trainer's `completion_hidden`).
        """
        embeds, mask, positions = self.prompt_inputs(images, rows)
        out = self.vl.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        lengths = mask.sum(1)  # prompts are right-padded: each row's last real position differs
        last = out.last_hidden_state[torch.arange(len(rows), device=self.device), lengths - 1]
        return cache, last, mask, positions.amax(dim=(0, 2)) + 1

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        images: ImageBatch,
        num_generations: int,
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        share: tuple[int, torch.Tensor] | None = None,
    ) -> Completions:
        """Sample G captions per image: one prefill per image, its KV cache shared by the G rows, then token by token.

        Special tokens other than the end tokens are never sampled (a sampled image placeholder would break the
        next forward). `temperature` 0 is greedy. `generator` (on the model's device) seeds the draws; None uses
        the global RNG. `share`: these rows' place in a distributed batch (see :func:`sample_tokens`).
        """
        if num_generations < 1:
            raise ConfigError(f"num_generations must be >= 1, got {num_generations}")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ConfigError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
        with self._decode_precision():
            cache, last, mask, next_pos = self.prefill(images, list(range(len(images.prompt_ids))))
            static = PrefixSharedKVCache.from_prefill(cache, mask, num_generations, max_new_tokens)
            del cache  # its tensors live on in `static` as the shared prefix
            tokens, lengths, truncated = sample_tokens(
                self,
                static,
                last,
                next_pos,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                generator=generator,
                cuda_graphs=self.cuda_graphs,
                share=share,
            )
        return Completions(tokens, lengths, truncated, num_generations)

    def _decode_precision(self):
        """bf16 autocast for an fp32 model on CUDA (`cuda_dtype`); nothing on a CPU."""
        if self.device.type != "cuda" or self.cuda_dtype is None or self.encoder.dtype != torch.float32:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.cuda_dtype, cache_enabled=False)  # no weight cache across graphs

    def decode(self, completions: Completions) -> list[str]:
        """Caption texts (special tokens dropped, whitespace stripped), in the completions' order."""
        texts = self.tokenizer.batch_decode(
            [completions.token_list(i).tolist() for i in range(len(completions.lengths))], skip_special_tokens=True
        )
        return [t.strip() for t in texts]

    def caption(
        self,
        images: Sequence[np.ndarray | Image.Image],
        num_generations: int = 1,
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        prompt: str | None = None,
    ) -> list[str]:
        """encode → sample → decode, in chunks of at most `batch_size` sequences. Returns B * G strings,
        image-major. Greedy (temperature 0) samples one caption per image and repeats it G times."""
        if num_generations < 1:
            raise ConfigError(f"num_generations must be >= 1, got {num_generations}")
        g = num_generations if temperature > 0 else 1
        per_chunk = max(1, self.batch_size // g)
        captions: list[str] = []
        for lo in range(0, len(images), per_chunk):
            encoded = self.encode_images(images[lo : lo + per_chunk], prompt=prompt)
            completions = self.sample(
                encoded, g, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, generator=generator
            )
            captions += self.decode(completions)
        return captions if g == num_generations else [c for c in captions for _ in range(num_generations)]


def _as_rgb_array(image, index: int) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return image
    what = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
    raise ConfigError(f"image {index}: expected a PIL image or a uint8 array [H, W, 3], got a {what}")


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]
