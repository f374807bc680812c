"""Atomic output files and folders: a crash or an exception never leaves a half-written result behind.

Everything is written to a hidden temporary sibling first (same directory, hence same file system) and moved into
place with a rename, which readers observe as all-or-nothing. Durability across power loss (fsync) is not a goal:
outputs can be regenerated, and fsync per image would slow down large evaluation runs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from os import PathLike
from pathlib import Path

from PIL import Image

from uae_fast.errors import OutputError

__all__ = ["atomic_dir", "atomic_path", "ensure_output_dir", "save_image_atomic", "write_text_atomic"]

# JPEG cannot store alpha or palettes; other formats take any mode Pillow hands them.
_JPEG_MODES = frozenset({"RGB", "L", "CMYK"})


def _sibling(final: Path, tag: str, suffix: str = "") -> Path:
    # Hidden (leading dot) so folder listings, including list_image_files, skip leftovers; random so concurrent
    # writers of the same target never share a temporary; the suffix keeps format detection by extension working.
    return final.with_name(f".{final.name}.{tag}-{secrets.token_hex(4)}{suffix}")


@contextlib.contextmanager
def atomic_path(final_path: str | PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``final_path``; on success it is renamed onto ``final_path``.

    The temporary file is not created in advance, so files written to it get the normal permissions. On any
    exception it is deleted and ``final_path`` is left untouched.

    Args:
        final_path: Where the file should end up. Its folder must exist.

    Yields:
        The temporary path (``.{name}.tmp-<random>{suffix}``) to write to.
    """
    final = Path(final_path)
    tmp = _sibling(final, "tmp", final.suffix)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:  # including KeyboardInterrupt: never leave the temporary behind
        tmp.unlink(missing_ok=True)
        raise


def save_image_atomic(image: Image.Image, path: str | PathLike[str], **save_kwargs: object) -> Path:
    """Save ``image`` atomically; the format comes from the suffix (PNG if absent or unknown).

    Args:
        image: The image to save. It is converted to RGB first if the format is JPEG and cannot hold its mode.
        path: Destination file.
        **save_kwargs: Passed to :meth:`PIL.Image.Image.save` (e.g. ``quality=95``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    final = Path(path)
    fmt = Image.registered_extensions().get(final.suffix.lower(), "PNG")
    if fmt == "JPEG" and image.mode not in _JPEG_MODES:
        image = image.convert("RGB")
    with atomic_path(final) as tmp:
        image.save(tmp, format=fmt, **save_kwargs)
    return final


def write_text_atomic(path: str | PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    final = Path(path)
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding=encoding)
    return final


@contextlib.contextmanager
def atomic_dir(final_dir: str | PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``final_dir``; on success it replaces ``final_dir``.

    An existing ``final_dir`` is moved aside, the new folder renamed in, then the old one deleted, so the folder is
    complete at every moment except for the instant between the two renames. On any exception the temporary folder
    is deleted and ``final_dir`` is left as it was.

    Raises:
        OutputError: ``final_dir`` exists and is a file, or its parent folder does not exist.
    """
    final = Path(final_dir)
    if final.exists() and not final.is_dir():
        raise OutputError(f"{final} exists and is a file, not a folder; remove it or choose another path")
    tmp = _sibling(final, "tmp")
    try:
        tmp.mkdir()
    except OSError as exc:
        raise OutputError(f"{final}: cannot create a folder next to it ({exc.strerror or exc})") from None
    try:
        yield tmp
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(new: Path, final: Path) -> None:
    try:
        os.rename(new, final)  # POSIX renames onto a missing or empty folder in one step
        return
    except OSError:
        if not final.is_dir():
            raise
    old = _sibling(final, "old")
    os.rename(final, old)
    try:
        os.rename(new, final)
    except BaseException:
        os.rename(old, final)  # put the previous result back rather than leave nothing
        raise
    shutil.rmtree(old, ignore_errors=True)


def ensure_output_dir(path: str | PathLike[str], *, option: str = "--out") -> Path:
    """Create the output folder ``path`` (and its parents) if needed.

    Args:
        path: The output folder.
        option: How the user named this folder, used in messages (e.g. the CLI flag).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OutputError: ``path`` is an existing file or cannot be created; the message names it.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{option} {folder} exists and is a file, not a folder; remove it or choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent is a file, permission denied, read-only file system, ...
        raise OutputError(f"{option} {folder} cannot be created ({exc.strerror or exc})") from None
    return folder
