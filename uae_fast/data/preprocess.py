"""Qwen2.5-VL image preprocessing in C++: decoded uint8 images (or encoded bytes) straight to the model inputs.

:func:`qwen_preprocess` returns the same ``pixel_values`` / ``image_grid_thw`` as transformers'
``Qwen2VLImageProcessor`` (the torchvision backend, the default of transformers 5) -- bit for bit, not merely
within a tolerance. Both of transformers' processors round the resized image to uint8 before normalising, and our
resize reproduces each library's integer arithmetic, so the choice of processor is a flag:

* ``compat="torchvision"`` (default) matches ``Qwen2VLImageProcessor``: torch's uint8 antialiased bicubic (int16
  weights) and the fused rescale/normalise in float32.
* ``compat="pil"`` matches ``Qwen2VLImageProcessorPil``: Pillow's bicubic (22-bit weights) and NumPy's separate
  rescale (float64) and normalise (float32). Pillow 13 changed its pass order (vertical first when the height
  shrinks by more than twice as many pixels as the width), so we follow the installed Pillow's version.

The two processors differ from each other by one grey level in ~0.1-0.5% of resized pixels; we default to the
torchvision one because it is what ``AutoImageProcessor`` returns in transformers 5 and it is also the faster
of our two kernels (its int16 weights suit AVX2's multiply-add).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from uae_fast.data.images import DEFAULT_MAX_IMAGE_PIXELS

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "QWEN_MAX_PIXELS",
    "QWEN_MIN_PIXELS",
    "qwen_grid_thw",
    "qwen_preprocess",
    "qwen_preprocess_bytes",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# transformers' defaults for Qwen2-VL (size={"shortest_edge": 56*56, "longest_edge": 28*28*1280}).
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 28 * 28 * 1280
_COMPATS = ("torchvision", "pil")
# qwen_preprocess's options that qwen_preprocess_bytes passes through **kwargs.
_DEFAULT_OPTS = {
    "patch_size": 14,
    "merge_size": 2,
    "temporal_patch_size": 2,
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
    "simd": True,
}


def _native_compat(compat: str) -> str:
    if compat not in _COMPATS:
        raise ValueError(f"compat must be one of {_COMPATS}, got {compat!r}")
    if compat == "pil":
        import PIL

        return "pil" if int(PIL.__version__.split(".")[0]) >= 13 else "pil_legacy"
    return compat


def _native_args(
    min_pixels, max_pixels, patch_size, merge_size, temporal_patch_size, image_mean, image_std, compat, simd
) -> dict:
    return {
        "min_pixels": int(min_pixels),
        "max_pixels": int(max_pixels),
        "patch_size": int(patch_size),
        "merge_size": int(merge_size),
        "temporal_patch_size": int(temporal_patch_size),
        "image_mean": [float(v) for v in image_mean],
        "image_std": [float(v) for v in image_std],
        "compat": _native_compat(compat),
        "simd": bool(simd),
    }


def _resolve_threads(threads: int | None) -> int:
    if threads is None:
        return 1
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return int(threads)


def qwen_grid_thw(
    sizes: Sequence[tuple[int, int]] | np.ndarray,
    *,
    min_pixels: int = QWEN_MIN_PIXELS,
    max_pixels: int = QWEN_MAX_PIXELS,
    patch_size: int = 14,
    merge_size: int = 2,
) -> torch.LongTensor:
    """``image_grid_thw`` for images of the given original sizes, without touching pixels.

    Args:
        sizes: ``(height, width)`` per image, shape ``[n, 2]``.

    Returns:
        ``[n, 3]`` int64 rows ``(1, grid_h, grid_w)``; image ``i`` yields ``grid_h * grid_w`` patches and
        ``grid_h * grid_w / merge_size**2`` image tokens.

    Raises:
        ValueError: a size the processor refuses (aspect ratio above 200, ...), naming the image index.
    """
    from uae_fast import _C

    arr = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    return torch.from_numpy(_C.qwen_grid(arr, min_pixels, max_pixels, patch_size, merge_size))


def qwen_preprocess(
    images: Sequence[np.ndarray],
    *,
    min_pixels: int = QWEN_MIN_PIXELS,
    max_pixels: int = QWEN_MAX_PIXELS,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
    threads: int | None = 1,
    compat: str = "torchvision",
    source_sizes: Sequence[tuple[int, int]] | np.ndarray | None = None,
    simd: bool = True,
) -> dict[str, torch.Tensor]:
    """Resize, normalise and patchify decoded RGB images into Qwen2.5-VL inputs.

    Args:
        images: ``n`` arrays of shape ``[H_i, W_i, 3]``, dtype uint8 (e.g. from :mod:`uae_fast.data.decode`).
        min_pixels: Lower bound on the resized pixel count (the processor's ``size["shortest_edge"]``).
        max_pixels: Upper bound on the resized pixel count (``size["longest_edge"]``).
        patch_size: ViT patch side (14 for Qwen2/2.5-VL).
        merge_size: Patches merged per side into one LLM token (2).
        temporal_patch_size: Frames per patch; an image is repeated this many times (2).
        image_mean: Per-channel mean, in [0, 1] units.
        image_std: Per-channel standard deviation, in [0, 1] units.
        threads: Images processed in parallel (OpenMP, GIL released). Default 1.
        compat: ``"torchvision"`` (bit-exact with ``Qwen2VLImageProcessor``) or ``"pil"`` (with
            ``Qwen2VLImageProcessorPil``).
        source_sizes: Original ``(height, width)`` per image when ``images`` were decoded at a reduced scale; the
            target size (hence ``image_grid_thw``) is always computed from the original size.
        simd: Use the AVX2 kernels when the CPU has them (False forces the portable code; same output).

    Returns:
        ``{"pixel_values": FloatTensor [sum_i grid_h_i * grid_w_i, 3 * T * P * P], "image_grid_thw":
        LongTensor [n, 3]}`` -- pass them to the model in place of the processor's.

    Raises:
        ValueError: a bad array (dtype, shape) or a size the processor refuses; the message names the image index.
    """
    from uae_fast import _C

    if isinstance(images, np.ndarray) and images.ndim == 3:
        raise ValueError("images must be a list of (H, W, 3) arrays; wrap a single image in a list")
    sizes = None if source_sizes is None else np.asarray(source_sizes, dtype=np.int64).reshape(-1, 2)
    pixel_values, grid = _C.qwen_preprocess(
        list(images),
        sizes,
        **_native_args(
            min_pixels, max_pixels, patch_size, merge_size, temporal_patch_size, image_mean, image_std, compat, simd
        ),
        threads=_resolve_threads(threads),
    )
    return {"pixel_values": torch.from_numpy(pixel_values), "image_grid_thw": torch.from_numpy(grid)}


def qwen_preprocess_bytes(
    data: Sequence[bytes],
    *,
    min_pixels: int = QWEN_MIN_PIXELS,
    max_pixels: int = QWEN_MAX_PIXELS,
    threads: int | None = 1,
    backend: str = "auto",
    reduced_decode: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    compat: str = "torchvision",
    decoder=None,
    **kwargs,
) -> dict[str, torch.Tensor]:
    """Encoded image files -> Qwen2.5-VL inputs: decode (see :class:`~uae_fast.data.decode.ImageDecoder`) and
    :func:`qwen_preprocess`, one image at a time (each is resized right after it is decoded, while it is in cache).

    Args:
        data: Encoded files (JPEG, PNG, WebP, ...), one per image.
        threads: Threads, each decoding and preprocessing whole images.
        backend: Decoder backend (``"auto"``, ``"dali"``, ``"cpu"``).
        reduced_decode: Opt-in fast mode: JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still
            covers twice the target size (the bicubic antialias then does most of the low-pass; at 1x the error
            doubles). ``image_grid_thw`` is unchanged (sized from the original header) but pixels
            differ from the exact path (see the README's numbers); never the default.
        max_image_pixels: Largest accepted original image (width * height), checked from the header.
        decoder: An :class:`~uae_fast.data.decode.ImageDecoder` to reuse (keeps its DALI pipeline and thread pool
            across calls); by default one is made per call from ``backend``, ``threads`` and ``max_image_pixels``.
        **kwargs: As in :func:`qwen_preprocess`: patch_size, merge_size, temporal_patch_size, image_mean,
            image_std, simd.

    Returns:
        As :func:`qwen_preprocess`.

    Raises:
        uae_fast.errors.ImageLoadError: an image cannot be decoded (message names its index).
        ValueError: a size the processor refuses, naming the image index.
    """
    from uae_fast import _C
    from uae_fast.data.decode import ImageDecoder
    from uae_fast.errors import ImageLoadError

    threads = _resolve_threads(threads)
    opts = dict(_DEFAULT_OPTS)
    unknown = sorted(set(kwargs) - set(opts))
    if unknown:
        raise TypeError(f"qwen_preprocess_bytes() got unexpected keyword arguments {unknown}")
    opts.update(kwargs)
    args = _native_args(min_pixels, max_pixels, compat=compat, **opts)
    own = decoder is None
    if own:
        decoder = ImageDecoder(backend=backend, threads=threads, max_pixels=max_image_pixels)
    # Each image is resized as soon as it is decoded (while its pixels are in cache, into a reused decode buffer);
    # the batch is planned from the original sizes in the headers, as image_grid_thw must be.
    state = {}

    def start(sizes: np.ndarray) -> None:
        state["sizes"] = sizes.tolist()
        state["batch"] = _C.QwenBatch(sizes, **args)

    def put(i: int, image: np.ndarray) -> None:
        if not reduced_decode and list(image.shape[:2]) != state["sizes"][i]:
            h, w = state["sizes"][i]
            raise ImageLoadError(f"image {i}: decoded to {image.shape[0]}x{image.shape[1]}, header says {h}x{w}")
        state["batch"].put(i, image)

    try:
        min_sizes = None
        if reduced_decode:
            patch, merge = opts["patch_size"], opts["merge_size"]
            grid = qwen_grid_thw(
                decoder.sizes(data), min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch, merge_size=merge
            )
            min_sizes = [(2 * int(h) * patch, 2 * int(w) * patch) for _, h, w in grid.tolist()]
        decoder.decode_each(data, put, min_sizes=min_sizes, on_sizes=start)
    finally:
        if own:
            decoder.close()
    pixel_values, grid = state["batch"].result()
    return {"pixel_values": torch.from_numpy(pixel_values), "image_grid_thw": torch.from_numpy(grid)}
