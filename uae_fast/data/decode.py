"""Batch image decoding to uint8 RGB arrays ``[H, W, 3]``: NVIDIA DALI when installed, else a CPU decoder.

Backends, in the order ``backend="auto"`` tries them:

* ``dali-mixed`` -- DALI's GPU JPEG decoder (nvJPEG), on a machine with CUDA and DALI installed.
* ``dali-cpu`` -- DALI's CPU pipeline (libjpeg-turbo), when DALI is installed but no GPU is usable.
* ``cpu`` -- libjpeg-turbo through ``simplejpeg`` for JPEGs (Pillow when simplejpeg is absent) and Pillow for
  everything else, on a thread pool.

Every backend returns the same pixels as :func:`uae_fast.data.images.load_image` (EXIF orientation applied,
transparency over white, CMYK / palette / 16-bit converted): the formats only Pillow converts the way
``load_image`` does (CMYK and YCCK JPEGs, PNGs with alpha or palette, 16-bit data, WebP, GIF, TIFF, ...) always go
through Pillow; DALI and simplejpeg get plain 8-bit RGB/grey JPEGs (and DALI plain PNGs). Sizes are checked
from the header before any pixel is decoded, and every failure is an ``ImageLoadError`` naming the image index.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from uae_fast.data.images import DEFAULT_MAX_IMAGE_PIXELS, check_geometry, load_image, one_line
from uae_fast.errors import ImageLoadError

__all__ = ["BACKENDS", "ImageDecoder", "available_backends", "decode_images"]

BACKENDS = ("dali-mixed", "dali-cpu", "cpu")
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# simplejpeg's names for the colour spaces libjpeg-turbo converts to RGB exactly as Pillow does.
_PLAIN_JPEG = frozenset({"YCbCr", "Gray", "RGB"})
# decode_each keeps each thread's output buffer for the next call up to this size (a 21 MP RGB image).
_KEEP_BUFFER_BYTES = 64 << 20


@dataclass(frozen=True)
class _Header:
    kind: str  # "jpeg" (plain 8-bit RGB/grey), "png" (plain 8-bit RGB/grey), "other" (Pillow only)
    height: int  # after EXIF orientation
    width: int
    orientation: int  # EXIF orientation tag, 1 = upright


def _simplejpeg():
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def _dali_usable() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _cuda_usable() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def available_backends() -> list[str]:
    """The backends that can run on this machine, fastest first (``cpu`` is always available)."""
    found = []
    if _dali_usable():
        if _cuda_usable():
            found.append("dali-mixed")
        found.append("dali-cpu")
    return found + ["cpu"]


def _orientation(data: bytes) -> int:
    # Only JPEGs carrying an EXIF block can be rotated; the substring test skips Pillow's parser for the rest.
    if b"Exif\x00\x00" not in data[:65536]:
        return 1
    try:
        with Image.open(io.BytesIO(data)) as img:
            value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # malformed EXIF: load_image ignores it too
        return 1
    return value if value in range(1, 9) else 1


def _probe(data: bytes, label: str, max_pixels: int) -> _Header:
    """Reads the header only: format, size and orientation, and whether a fast decoder may take the image."""
    if len(data) == 0:
        raise ImageLoadError(f"{label}: empty data (0 bytes)")
    sj = _simplejpeg()
    if data[:3] == _JPEG_MAGIC and sj is not None:
        try:
            height, width, colorspace, _ = sj.decode_jpeg_header(data)
        except ValueError as exc:
            raise ImageLoadError(f"{label}: corrupt or truncated image data ({one_line(exc)})") from None
        check_geometry(label, width, height, max_pixels)
        orient = _orientation(data)
        if orient >= 5:  # orientations 5-8 swap the axes
            height, width = width, height
        return _Header("jpeg" if colorspace in _PLAIN_JPEG else "other", height, width, orient)
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode, info, (width, height) = img.format, img.mode, dict(img.info), img.size
            orient = img.getexif().get(ExifTags.Base.Orientation, 1) if fmt in ("JPEG", "PNG") else 1
    except UnidentifiedImageError:
        raise ImageLoadError(f"{label}: not an image (unrecognised format)") from None
    except Exception as exc:
        raise ImageLoadError(f"{label}: corrupt or truncated image data ({one_line(exc)})") from None
    check_geometry(label, width, height, max_pixels)
    orient = orient if orient in range(1, 9) else 1
    if orient >= 5:
        height, width = width, height
    plain = mode in ("RGB", "L") and "transparency" not in info
    kind = {"JPEG": "jpeg", "PNG": "png"}.get(fmt, "other") if plain else "other"
    return _Header(kind, height, width, orient)


def _sizes(heads: list[_Header]) -> np.ndarray:
    return np.array([(h.height, h.width) for h in heads], dtype=np.int64).reshape(-1, 2)


def _apply_orientation(a: np.ndarray, orientation: int) -> np.ndarray:
    """The array version of PIL.ImageOps.exif_transpose (tag values 1-8)."""
    if orientation == 2:
        a = a[:, ::-1]
    elif orientation == 3:
        a = a[::-1, ::-1]
    elif orientation == 4:
        a = a[::-1]
    elif orientation == 5:
        a = a.transpose(1, 0, 2)
    elif orientation == 6:
        a = np.rot90(a, -1)
    elif orientation == 7:
        a = np.rot90(a, 2).transpose(1, 0, 2)
    elif orientation == 8:
        a = np.rot90(a, 1)
    return np.ascontiguousarray(a)


class ImageDecoder:
    """Decodes batches of encoded images into ``[H, W, 3]`` uint8 RGB arrays.

    Args:
        backend: ``"auto"`` (DALI when installed, GPU decoder when CUDA is usable), ``"dali"`` (DALI, GPU if
            usable else CPU; error if DALI is missing), ``"dali-cpu"``, ``"dali-mixed"`` or ``"cpu"``.
        threads: CPU threads (DALI's ``num_threads``, or the CPU decoder's thread pool).
        max_pixels: Largest accepted width * height, checked from the header before decoding.
        max_batch: Images per DALI pipeline run (larger inputs are decoded in chunks).
    """

    def __init__(
        self,
        backend: str = "auto",
        *,
        threads: int = 1,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_batch: int = 64,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        available = available_backends()
        if backend == "auto":
            backend = available[0]
        elif backend == "dali":
            if not _dali_usable():
                raise ValueError("backend='dali' needs NVIDIA DALI: pip install 'uae_fast[dali]'")
            backend = available[0]
        elif backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto', 'dali' or one of {BACKENDS}, got {backend!r}")
        elif backend not in available:
            raise ValueError(f"backend {backend!r} is not usable here (available: {available})")
        self.backend = backend
        self.threads = int(threads)
        self.max_pixels = int(max_pixels)
        self.max_batch = int(max_batch)
        self._pipe = None
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self._local = threading.local()  # per-thread decode buffers of decode_each

    def sizes(self, data: Sequence[bytes]) -> np.ndarray:
        """Original ``(height, width)`` of each image (after EXIF orientation), ``[n, 2]`` int64, header only."""
        return _sizes(self._probe_all(data))

    def _probe_all(self, data: Sequence[bytes]) -> list[_Header]:
        return [_probe(bytes(d), f"image {i}", self.max_pixels) for i, d in enumerate(data)]

    def decode_each(
        self,
        data: Sequence[bytes],
        fn: Callable[[int, np.ndarray], object],
        *,
        min_sizes: Sequence[tuple[int, int]] | None = None,
        on_sizes: Callable[[np.ndarray], object] | None = None,
    ) -> None:
        """Decodes the images one by one and calls ``fn(index, image)`` with each, on the decoder's threads.

        Consuming each image as soon as it is decoded keeps its pixels in cache and lets the CPU decoder reuse one
        output buffer per thread: the ``image`` passed to ``fn`` is valid only during the call (copy it to keep it).
        Measured here on 1.3 MP JPEGs, this saves ~1.4 ms per image of page faults over :meth:`decode`, which must
        allocate every image of the batch. The DALI backends decode in batches and then call ``fn``.

        Args:
            data: Encoded files.
            fn: Called once per image, in any order (in parallel when ``threads > 1``); an exception it raises
                stops the work and propagates.
            min_sizes: As in :meth:`decode`.
            on_sizes: Called once with the original sizes (``[n, 2]`` int64, as :meth:`sizes`) after every header
                was checked and before any pixel is decoded.

        Raises:
            ImageLoadError: as :meth:`decode`.
        """
        blobs = [bytes(d) for d in data]
        heads = self._probe_all(blobs)
        if on_sizes is not None:
            on_sizes(_sizes(heads))
        if self.backend.startswith("dali") or _simplejpeg() is None:
            for i, arr in enumerate(self._decode_probed(blobs, heads, min_sizes)):
                fn(i, arr)
            return
        mins = None if min_sizes is None else list(min_sizes)

        def one(i: int) -> None:
            head, min_size = heads[i], None if mins is None else mins[i]
            buffer = self._buffer(head.height * head.width * 3) if head.kind == "jpeg" else None
            fn(i, self._decode_cpu(blobs[i], head, i, min_size, buffer=buffer))

        if self._pool is not None and len(blobs) > 1:
            for _ in self._pool.map(one, range(len(blobs))):
                pass
        else:
            for i in range(len(blobs)):
                one(i)

    def decode(self, data: Sequence[bytes], *, min_sizes: Sequence[tuple[int, int]] | None = None) -> list[np.ndarray]:
        """Decodes every image.

        Args:
            data: Encoded files.
            min_sizes: Opt-in reduced decode: ``(height, width)`` per image that the decoded JPEG must still cover;
                the CPU decoder then uses the smallest DCT scale (1/2, 1/4, 1/8) that does. Other formats and the
                DALI backends decode at full size.

        Returns:
            ``n`` C-contiguous ``[H_i, W_i, 3]`` uint8 arrays.

        Raises:
            ImageLoadError: an image is empty, not an image, corrupt, truncated or too large (names its index).
        """
        blobs = [bytes(d) for d in data]
        return self._decode_probed(blobs, self._probe_all(blobs), min_sizes)

    def _buffer(self, size: int) -> np.ndarray:
        """This thread's reusable decode buffer of at least ``size`` bytes (kept across calls up to 64 MiB)."""
        buf = getattr(self._local, "buf", None)
        if buf is not None and buf.size >= size:
            return buf
        buf = np.empty(size, np.uint8)
        if size <= _KEEP_BUFFER_BYTES:
            self._local.buf = buf
        return buf

    def _decode_probed(
        self, blobs: list[bytes], heads: list[_Header], min_sizes: Sequence[tuple[int, int]] | None
    ) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(blobs)
        fast = [i for i, h in enumerate(heads) if h.kind in ("jpeg", "png")]
        if self.backend.startswith("dali"):
            # DALI applies EXIF orientation itself; rotated images are rare, so they take the CPU path to keep one
            # definition of orientation handling.
            dali_items = [i for i in fast if heads[i].orientation == 1]
            for start in range(0, len(dali_items), self.max_batch):
                chunk = dali_items[start : start + self.max_batch]
                for i, arr in zip(chunk, self._decode_dali([blobs[i] for i in chunk], chunk)):
                    out[i] = arr
        rest = [i for i in range(len(blobs)) if out[i] is None]
        mins = None if min_sizes is None else list(min_sizes)

        def one(i: int) -> np.ndarray:
            return self._decode_cpu(blobs[i], heads[i], i, None if mins is None else mins[i])

        results = self._pool.map(one, rest) if self._pool is not None and len(rest) > 1 else map(one, rest)
        for i, arr in zip(rest, results):
            out[i] = arr
        return out  # type: ignore[return-value]

    def _decode_cpu(
        self,
        data: bytes,
        head: _Header,
        index: int,
        min_size: tuple[int, int] | None,
        buffer: np.ndarray | None = None,
    ) -> np.ndarray:
        label = f"image {index}"
        sj = _simplejpeg()
        if head.kind == "jpeg" and sj is not None:
            kwargs = {}
            if min_size is not None:
                mh, mw = min_size
                if head.orientation >= 5:  # the limits refer to the stored (unrotated) axes
                    mh, mw = mw, mh
                kwargs = {"min_height": int(mh), "min_width": int(mw)}
            if buffer is not None:
                kwargs["buffer"] = buffer
            try:
                arr = sj.decode_jpeg(data, colorspace="RGB", strict=True, **kwargs)
            except ValueError as exc:
                raise ImageLoadError(f"{label}: corrupt or truncated image data ({one_line(exc)})") from None
            return _apply_orientation(arr, head.orientation) if head.orientation != 1 else arr
        img = load_image(data, max_pixels=self.max_pixels, name=label)
        return np.asarray(img)

    def _dali_pipeline(self):
        if self._pipe is None:
            from nvidia.dali import fn, pipeline_def, types

            device = "mixed" if self.backend == "dali-mixed" else "cpu"

            @pipeline_def(batch_size=self.max_batch, num_threads=self.threads, prefetch_queue_depth=1)
            def decode_pipe():
                encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
                return fn.decoders.image(encoded, device=device, output_type=types.RGB)

            pipe = decode_pipe(device_id=0 if device == "mixed" else None, exec_dynamic=True)
            pipe.build()
            self._pipe = pipe
        return self._pipe

    def _decode_dali(self, blobs: list[bytes], indices: list[int]) -> list[np.ndarray]:
        try:
            pipe = self._dali_pipeline()
            pipe.feed_input("encoded", [np.frombuffer(b, dtype=np.uint8) for b in blobs])
            (images,) = pipe.run()
            if self.backend == "dali-mixed":
                images = images.as_cpu()
            # Copies: DALI reuses its output buffers on the next run.
            return [np.array(images[k]) for k in range(len(blobs))]
        except Exception as exc:  # a bad image poisons the whole pipeline: drop it and find the culprit on the CPU
            self._pipe = None
            heads = [_probe(b, f"image {i}", self.max_pixels) for b, i in zip(blobs, indices)]
            results = [self._decode_cpu(b, h, i, None) for b, h, i in zip(blobs, heads, indices)]
            warnings.warn(f"DALI failed on a batch that decodes on the CPU ({one_line(exc)[:200]})", stacklevel=3)
            return results

    def close(self) -> None:
        """Releases the thread pool and the DALI pipeline."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._pipe = None
        self._local = threading.local()

    def __enter__(self) -> ImageDecoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def decode_images(
    data: Sequence[bytes], *, backend: str = "auto", threads: int = 1, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> list[np.ndarray]:
    """One-shot :meth:`ImageDecoder.decode`; keep an :class:`ImageDecoder` to reuse its DALI pipeline."""
    with ImageDecoder(backend, threads=threads, max_pixels=max_pixels) as decoder:
        return decoder.decode(data)
