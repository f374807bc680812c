"""Backbone preprocessing as torch ops on the device: resize → centre crop → normalise, no PIL round trip.

Decoded images leave the sampler as float tensors [N, 3, H, W] in [0, 1] on the accelerator. Converting them to PIL
to run a processor would copy them to the host, quantise them and serialise the work on the CPU. Instead each
backbone's processor configuration is turned into a :class:`TensorPreprocess` that reproduces it with
``torch.nn.functional.interpolate(..., antialias=True)``.

PIL (and torchvision's uint8 path, which imitates it) resizes 8-bit images in two separable passes, horizontal then
vertical, rounding to 8 bits after each. A single float ``interpolate`` differs from that by up to 5/255 at sharp
edges, so by default (``resize_8bit=True``) we do the same: resize width, round, resize height, round. The float
kernels themselves equal PIL's (antialiased, bicubic a = -0.5). DINOv3's processor converts to float before resizing,
so it gets one float pass. Inputs are always rounded to 8-bit levels first: that is what the official pipeline sees
after a decoded image is saved as PNG, and it keeps the training reward equal to the evaluation score.

Tolerance against the official preprocessing of the same image given as PIL (tests/rewards/test_preprocess.py):
same output size and crop window; per pixel at most 2/255 before normalisation (PIL's fixed-point weights), mean
below 0.05/255. This holds for transformers' CLIPImageProcessor / CLIPImageProcessorPil / BitImageProcessor (DINOv2) /
DINOv3ViTImageProcessor and for the OpenAI-CLIP torchvision transform LongCLIP uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "TensorPreprocess",
    "preprocess_many",
    "to_levels",
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "as_image_batch",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# PIL resample ids used in processor configs → interpolate modes. Nearest/box/hamming/lanczos are not used by the
# four reward backbones; lanczos falls back to bicubic as transformers does on CUDA.
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "bicubic"}
# Processors that convert to float before resizing (no 8-bit rounding between the passes).
_FLOAT_RESIZE_PROCESSORS = frozenset({"DINOv3ViTImageProcessor", "DINOv3ViTImageProcessorFast"})


@dataclass(frozen=True)
class TensorPreprocess:
    """Resize / centre-crop / normalise of float images, equal to a processor configuration.

    Attributes:
        shortest_edge: Resize so the short side has this length, keeping the aspect ratio (long side truncated,
            as transformers and torchvision compute it). Exclusive with ``size``.
        size: Resize to exactly (height, width).
        crop: Centre crop (height, width) after the resize, or None.
        crop_rounding: "floor" (transformers: ``int((H - h) / 2)``) or "round" (torchvision ``CenterCrop``, used
            by the OpenAI / LongCLIP transform).
        interpolation: "bicubic" or "bilinear" (antialiased, like PIL and torchvision).
        mean, std: Per-channel normalisation applied to pixels in [0, 1].
        resize_8bit: Emulate PIL's 8-bit two-pass resize (see the module docstring); False resizes in one float pass.
    """

    shortest_edge: int | None = None
    size: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    crop_rounding: str = "floor"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resize_8bit: bool = True

    def __post_init__(self):
        if (self.shortest_edge is None) == (self.size is None):
            raise ValueError("TensorPreprocess needs exactly one of shortest_edge or size")
        if self.crop_rounding not in ("floor", "round"):
            raise ValueError(f"crop_rounding must be 'floor' or 'round', got {self.crop_rounding!r}")

    @classmethod
    def from_image_processor(cls, processor) -> TensorPreprocess:
        """Read a transformers image processor's resize/crop/normalise settings (either backend)."""
        size = dict(processor.size) if getattr(processor, "do_resize", True) else None
        if size is None:
            raise ValueError(f"{type(processor).__name__} does not resize; the reward needs a fixed input size")
        crop = None
        if getattr(processor, "do_center_crop", False):
            crop = (int(processor.crop_size["height"]), int(processor.crop_size["width"]))
        resample = int(getattr(processor, "resample", 3))
        common = dict(
            resize_8bit=type(processor).__name__ not in _FLOAT_RESIZE_PROCESSORS,
            crop=crop,
            crop_rounding="floor",
            interpolation=_RESAMPLE.get(resample, "bicubic"),
            mean=tuple(float(m) for m in processor.image_mean),
            std=tuple(float(s) for s in processor.image_std),
        )
        if size.get("shortest_edge"):
            return cls(shortest_edge=int(size["shortest_edge"]), **common)
        return cls(size=(int(size["height"]), int(size["width"])), **common)

    @classmethod
    def openai_clip(cls, n_px: int) -> TensorPreprocess:
        """The OpenAI CLIP / LongCLIP transform: Resize(n_px, bicubic), CenterCrop(n_px), CLIP normalisation."""
        return cls(shortest_edge=n_px, crop=(n_px, n_px), crop_rounding="round", interpolation="bicubic")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize, before the crop."""
        if self.size is not None:
            return self.size
        short, long = (height, width) if height <= width else (width, height)
        new_long = int(self.shortest_edge * long / short)
        return (self.shortest_edge, new_long) if height <= width else (new_long, self.shortest_edge)

    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
        """Preprocess images.

        Args:
            images: Float tensor [N, 3, H, W] in [0, 1], or a sequence of [3, H_i, W_i] tensors of any sizes
                (e.g. source photographs); all on one device.
            dtype: Output dtype (default float32). Computation is always float32.

        Returns:
            pixel_values [N, 3, h, w] ready for the backbone.
        """
        out = preprocess_many([self], images)[self]
        return out if dtype is None else out.to(dtype)

    def from_levels(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocess [n, 3, H, W] float images already rounded to 0..255 levels (see :func:`to_levels`)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(x.shape)}")
        h, w = self.output_size(*x.shape[-2:])
        if self.resize_8bit:
            x = _resize_8bit(x, h, w, self.interpolation)
        elif (h, w) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(h, w), mode=self.interpolation, antialias=True).clamp_(0.0, 255.0)
        if self.crop is not None:
            x = _center_crop(x, self.crop, self.crop_rounding)
        return self._normalise(x)

    def differentiable(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocess [N, 3, H, W] floats in [0, 1] under autograd (the cold start's loss backpropagates through it).

        The same resize, crop and normalisation in one float pass, without the 8-bit rounding and clamping of the
        reward's path (rounding has a zero gradient): within a few levels of :meth:`__call__` at sharp edges.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
        x = images.float() * 255.0
        h, w = self.output_size(*x.shape[-2:])
        if (h, w) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(h, w), mode=self.interpolation, antialias=True)
        if self.crop is not None:
            x = _center_crop(x, self.crop, self.crop_rounding)
        return self._normalise(x)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        # (x / 255 - mean) / std as one multiply-add over the cropped (smaller) tensor.
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        return torch.addcmul(-mean / std, x, 1.0 / (std * 255.0))


def to_levels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats → rounded 0..255 levels (float32), what an 8-bit PNG of the image holds."""
    return x.float().mul(255.0).round_().clamp_(0.0, 255.0)


def preprocess_many(
    preprocs: Sequence[TensorPreprocess], images: torch.Tensor | Sequence[torch.Tensor]
) -> dict[TensorPreprocess, torch.Tensor]:
    """Apply several preprocessings to the same images, converting each image to 8-bit levels only once.

    On a CPU the work goes one image at a time: a full-resolution float batch does not fit in the caches, and the
    per-image passes measured ~2x faster per image than one 32-image call (512 px, 1 thread). On a GPU the whole
    batch goes at once. Lists of differently sized images are always processed per image.

    Returns:
        TensorPreprocess → pixel_values [N, 3, h, w] float32, for each distinct entry of ``preprocs``.
    """
    unique = list(dict.fromkeys(preprocs))
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
        step = 1 if images.device.type == "cpu" else max(1, images.shape[0])
        chunks = [images[i : i + step] for i in range(0, images.shape[0], step)]
    else:
        for im in images:
            if im.dim() != 3 or im.shape[0] != 3:
                raise ValueError(f"each image must be [3, H, W], got {tuple(im.shape)}")
        chunks = [im.unsqueeze(0) for im in images]
    if not chunks:
        raise ValueError("no images to preprocess")
    parts: dict[TensorPreprocess, list[torch.Tensor]] = {p: [] for p in unique}
    for chunk in chunks:
        levels = to_levels(chunk)
        for p in unique:
            parts[p].append(p.from_levels(levels))
    return {p: torch.cat(v) for p, v in parts.items()}


def _resize_8bit(x: torch.Tensor, h: int, w: int, mode: str) -> torch.Tensor:
    """Two-pass resize of 0..255 floats with 8-bit rounding between passes, as PIL does (horizontal first)."""
    height, width = x.shape[-2:]
    if w != width:
        x = F.interpolate(x, size=(height, w), mode=mode, antialias=True).round_().clamp_(0.0, 255.0)
    if h != height:
        x = F.interpolate(x, size=(h, w), mode=mode, antialias=True).round_().clamp_(0.0, 255.0)
    return x


def _center_crop(x: torch.Tensor, crop: tuple[int, int], rounding: str) -> torch.Tensor:
    ch, cw = crop
    h, w = x.shape[-2:]
    if ch > h or cw > w:  # both official crops pad with zeros (black) when the image is smaller than the crop
        pad = [(cw - w) // 2 if cw > w else 0, (cw - w + 1) // 2 if cw > w else 0]
        pad += [(ch - h) // 2 if ch > h else 0, (ch - h + 1) // 2 if ch > h else 0]
        x = F.pad(x, pad, value=0.0)
        h, w = x.shape[-2:]
    offset = (lambda d: int(round(d / 2.0))) if rounding == "round" else (lambda d: int(d / 2.0))
    top, left = offset(h - ch), offset(w - cw)
    return x[..., top : top + ch, left : left + cw]


def as_image_batch(images) -> torch.Tensor | list[torch.Tensor]:
    """PIL images / uint8 arrays / float tensors → float tensors in [0, 1] ([N,3,H,W] or a list of [3,H,W])."""
    import numpy as np
    from PIL import Image

    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        return images.float() / 255.0 if images.dtype == torch.uint8 else images
    out = []
    for im in images:
        if isinstance(im, Image.Image):
            im = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
        elif isinstance(im, np.ndarray):
            im = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)
        out.append(im.float() / 255.0 if im.dtype == torch.uint8 else im)
    return out
