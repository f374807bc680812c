"""Robust image loading: every failure becomes a one-line :class:`ImageLoadError`, every success an RGB image.

Messages start with the file name (or ``<bytes>`` / ``<image>``) so a CLI run over a folder says which file is bad.
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from uae_fast.errors import ImageLoadError

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IMAGE_EXTENSIONS",
    "MAX_ASPECT_RATIO",
    "ImageSource",
    "LoadedImage",
    "Skipped",
    "list_image_files",
    "load_image",
    "load_images",
    "check_geometry",
    "one_line",
]

DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
# The Qwen2.5-VL image processor rejects images whose long/short side ratio exceeds 200.
MAX_ASPECT_RATIO = 200
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

ImageSource = str | PathLike | bytes | bytearray | memoryview | Image.Image

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
# Serialises the rare calls that must temporarily change Pillow's process-wide settings (see _strict_pillow).
_PIL_GLOBALS_LOCK = threading.Lock()


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image. ``name`` is a display name (file stem, de-duplicated); ``path`` is None for in-memory data."""

    name: str
    path: str | None
    image: Image.Image


@dataclass(frozen=True)
class Skipped:
    """A source that ``load_images(skip_bad=True)`` could not load, with the one-line reason."""

    source: str
    reason: str


@contextlib.contextmanager
def _strict_pillow(max_pixels: int) -> Iterator[None]:
    """Make Pillow refuse truncated data and defer to *our* pixel limit for the duration of one load.

    Pillow's knobs are module globals. The common case changes nothing (so loads in threads never contend); only
    when another library switched LOAD_TRUNCATED_IMAGES on, or ``max_pixels`` exceeds Pillow's hard bomb limit
    (2 * MAX_IMAGE_PIXELS), are the globals changed under a lock and restored afterwards.
    """
    pil_limit = Image.MAX_IMAGE_PIXELS
    must_patch = ImageFile.LOAD_TRUNCATED_IMAGES or (pil_limit is not None and max_pixels > 2 * pil_limit)
    with warnings.catch_warnings():
        # We enforce max_pixels ourselves with a clearer message; Pillow's warning would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if not must_patch:
            yield
            return
        with _PIL_GLOBALS_LOCK:
            old_truncated, old_limit = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            if old_limit is not None and max_pixels > 2 * old_limit:
                Image.MAX_IMAGE_PIXELS = max_pixels
            try:
                yield
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = old_truncated, old_limit


def _too_large(label: str, max_pixels: int, pixels: int | None, size: str = "") -> ImageLoadError:
    amount = f"{size}{pixels:,} pixels" if pixels is not None else "size unknown"
    return ImageLoadError(
        f"{label}: image is too large ({amount}, limit {max_pixels:,} pixels); "
        "pass a larger max_pixels to load_image() if the file is trusted"
    )


def check_geometry(label: str, width: int, height: int, max_pixels: int) -> None:
    """Reject sizes from the header, before any pixel data is decoded."""
    if width < 1 or height < 1:
        raise ImageLoadError(f"{label}: image has an empty size ({width}x{height})")
    if width * height > max_pixels:
        raise _too_large(label, max_pixels, width * height, f"{width}x{height} = ")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        shown = f"{ratio:.1f}".rstrip("0").rstrip(".")
        raise ImageLoadError(
            f"{label}: aspect ratio {shown}:1 ({width}x{height}) exceeds the limit of {MAX_ASPECT_RATIO}:1 "
            "accepted by the Qwen2.5-VL processor; crop or pad the image"
        )


def _sixteen_bit_to_rgb(img: Image.Image) -> Image.Image:
    # Pillow's convert("RGB") clips 16-bit values at 255 (almost everything turns white); scale by 1/257 instead,
    # rounding half up, so 65535 -> 255 and 32768 -> 128.
    values = np.asarray(img).astype(np.float64)
    gray = np.floor(np.clip(values, 0, 65535) / 257.0 + 0.5).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    key = img.info.get("transparency")
    if isinstance(key, int):  # a tRNS colour key in a 16-bit grey PNG: those pixels are transparent -> white
        rgb[values == key] = 255
    return Image.fromarray(rgb, "RGB")


def _float_to_rgb(img: Image.Image) -> Image.Image:
    values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    # Float images have no fixed range: treat them as [0, 1] when they fit, else as [0, 255].
    scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
    gray = np.floor(np.clip(values * scale, 0, 255) + 0.5).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparent pixels are composited over white."""
    if img.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(img)
    if img.mode == "F":
        return _float_to_rgb(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        # Pillow converts premultiplied "La" only to "LA", so go through that first.
        rgba = (img.convert("LA") if img.mode == "La" else img).convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # 1, L, P, RGB, CMYK, YCbCr, LAB, HSV: Pillow's conversion is correct here


def _decode(img: Image.Image, label: str, max_pixels: int) -> Image.Image:
    check_geometry(label, img.width, img.height, max_pixels)
    try:
        img.load()
    except Image.DecompressionBombError as exc:  # e.g. a GIF frame larger than its header said
        raise _too_large(label, max_pixels, _bomb_pixels(exc)) from None
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, struct.error, zlib.error, ...
        raise ImageLoadError(f"{label}: corrupt or truncated image data ({one_line(exc)})") from None
    try:
        if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # skip exif_transpose's copy when upright
            img = ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block should not make otherwise good pixels unusable
        pass
    try:
        return _to_rgb(img)
    except (ValueError, OSError) as exc:
        raise ImageLoadError(f"{label}: cannot convert image mode {img.mode} to RGB ({one_line(exc)})") from None


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and whitespace-collapsed message (for one-line errors and logs)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _bomb_pixels(exc: BaseException) -> int | None:
    # Pillow's message is "Image size (N pixels) exceeds limit of ..."; the size is not available otherwise.
    match = re.search(r"\((\d+) pixels\)", str(exc))
    return int(match.group(1)) if match else None


def _open_and_decode(fp: BinaryIO, label: str, max_pixels: int) -> Image.Image:
    try:
        img = Image.open(fp)
    except UnidentifiedImageError:
        raise ImageLoadError(f"{label}: not an image (unrecognised format)") from None
    except Image.DecompressionBombError as exc:  # raised by Image.open from the header size alone
        raise _too_large(label, max_pixels, _bomb_pixels(exc)) from None
    except Exception as exc:  # a recognised header whose body is broken (e.g. a truncated WebP)
        raise ImageLoadError(f"{label}: corrupt or truncated image data ({one_line(exc)})") from None
    with img:
        return _decode(img, label, max_pixels)


def load_image(
    source: ImageSource, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, name: str | None = None
) -> Image.Image:
    """Load an image as a fully decoded 8-bit RGB PIL image.

    EXIF orientation is applied, transparency is composited over white and 16-bit / float data is rescaled to
    8 bits. Pillow decodes 16-bit RGB(A) PNGs straight to 8 bits (high byte), so those arrive already reduced.

    Args:
        source: A file path, the encoded file contents as bytes, or a PIL image (never modified).
        max_pixels: Largest width * height accepted; checked from the header before decoding.
        name: Label used in error messages instead of the file name (default ``<bytes>`` / ``<image>``).

    Returns:
        A new RGB image that does not reference any open file.

    Raises:
        ImageLoadError: The source is missing, not an image, truncated, too large or too elongated; the
            one-line message starts with the file name.
    """
    with _strict_pillow(max_pixels):
        if isinstance(source, Image.Image):
            return _decode(source, name or "<image>", max_pixels)
        if isinstance(source, (bytes, bytearray, memoryview)):
            label = name or "<bytes>"
            if len(source) == 0:
                raise ImageLoadError(f"{label}: empty data (0 bytes)")
            return _open_and_decode(io.BytesIO(bytes(source)), label, max_pixels)
        path = Path(source)
        label = name or path.name or str(path)
        if not path.exists():
            raise ImageLoadError(f"{label}: no such file ({path})")
        if path.is_dir():
            raise ImageLoadError(f"{label}: is a directory, not an image file ({path})")
        try:
            with open(path, "rb") as fp:
                if path.stat().st_size == 0:
                    raise ImageLoadError(f"{label}: empty file (0 bytes)")
                return _open_and_decode(fp, label, max_pixels)
        except OSError as exc:  # permission denied, I/O error: ImageLoadError is not an OSError, so it passes
            raise ImageLoadError(f"{label}: cannot read file ({exc.strerror or one_line(exc)})") from None


def load_images(
    sources: Iterable[ImageSource], *, skip_bad: bool = False, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[list[LoadedImage], list[Skipped]]:
    """Load several images, optionally skipping the bad ones.

    Display names are file stems; repeated stems get ``-2``, ``-3``... so they can name output files safely.
    In-memory sources are called ``image<index>``.

    Args:
        sources: Paths, bytes or PIL images.
        skip_bad: Record unloadable sources in the second list and go on, instead of raising on the first.
        max_pixels: Passed to :func:`load_image`.

    Returns:
        The loaded images in input order, and the skipped sources with their reasons.

    Raises:
        ImageLoadError: A source cannot be loaded and ``skip_bad`` is False.
    """
    loaded: list[LoadedImage] = []
    skipped: list[Skipped] = []
    used: set[str] = set()
    for index, source in enumerate(sources):
        if isinstance(source, (str, PathLike)):
            path: str | None = str(source)
            stem, shown = Path(source).stem or f"image{index}", str(source)
        else:
            path, stem = None, f"image{index}"
            shown = "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else "<image>"
        try:
            image = load_image(source, max_pixels=max_pixels)
        except ImageLoadError as exc:
            if not skip_bad:
                raise
            skipped.append(Skipped(source=shown, reason=str(exc)))
            continue
        name, n = stem, 1
        while name in used:
            n += 1
            name = f"{stem}-{n}"
        used.add(name)
        loaded.append(LoadedImage(name=name, path=path, image=image))
    return loaded, skipped


def list_image_files(folder: str | PathLike[str]) -> list[Path]:
    """List the image files directly inside ``folder``, sorted by name.

    Files are recognised by extension (case-insensitive). Hidden files are ignored: they are macOS ``._*``
    resource forks or temporary files of an interrupted atomic write, never real inputs.

    Raises:
        ImageLoadError: The folder does not exist, is not a folder, or holds no image files.
    """
    root = Path(folder)
    if not root.exists():
        raise ImageLoadError(f"{root}: no such folder")
    if not root.is_dir():
        raise ImageLoadError(f"{root}: not a folder")
    files = sorted(
        p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )
    if not files:
        raise ImageLoadError(f"{root}: no image files ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) in this folder")
    return files
