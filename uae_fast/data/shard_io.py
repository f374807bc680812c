"""Image-caption pairs on disk: WebDataset tar shards (read and written with the `webdataset` package) and, for small
sets, a plain folder with `captions.jsonl`.

A tar shard holds samples as consecutive files sharing a key: `<key>.jpg|jpeg|png|webp` (the image, stored as the
original encoded bytes) and `<key>.txt` (the caption, UTF-8) or `<key>.json` (an object with a "caption" string).
A `captions.jsonl` folder has one `{"image": "relative/path.jpg", "caption": "..."}` object per line; its lines are
cut into virtual shards so that ranks can split them like tar shards.

Reading never raises on bad data: every sample comes back as a :class:`RawSample` whose `problem` says what is
wrong with it (a truncated tar ends in one sample carrying the `corrupt_shard` problem). Callers skip and count, or
abort, as they are asked to.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..io import atomic_path

__all__ = [
    "CAPTION_EXTENSIONS",
    "SHARD_IMAGE_EXTENSIONS",
    "JsonlShard",
    "RawSample",
    "SampleProblem",
    "TarShard",
    "resolve_shards",
    "sample_caption",
    "write_shard",
]

SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "json")
JSONL_NAME = "captions.jsonl"
JSONL_SHARD_LINES = 256  # lines per virtual shard of a captions.jsonl folder (fewer when ranks need more shards)


class SampleProblem(Exception):
    """Why a sample cannot be used: `kind` (e.g. "empty_caption") and a one-line message naming the sample."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class RawSample:
    shard: str  # the shard's name
    index: int  # position in the shard: every sample counts, good or bad (resume positions use it)
    key: str
    image: bytes | None = None  # the encoded image file
    caption: bytes | str | None = None  # raw: a .txt's bytes, or the caption string of a .json / jsonl line
    problem: SampleProblem | None = None  # set when the sample cannot be used

    @property
    def label(self) -> str:
        """`shard/key`, the name errors and reports use."""
        return f"{self.shard}/{self.key}" if self.key else self.shard


def sample_caption(sample: RawSample) -> str:
    """The sample's caption as text, stripped.

    Raises:
        SampleProblem: the sample has a problem already, or its caption is missing, not UTF-8 or empty.
    """
    if sample.problem is not None:
        raise sample.problem
    raw = sample.caption
    if raw is None:
        raise SampleProblem("missing_caption", f"{sample.label}: no caption (.txt or .json with 'caption')")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SampleProblem(
                "non_utf8_caption", f"{sample.label}: caption is not UTF-8 ({exc.reason} at byte {exc.start})"
            ) from None
    text = raw.strip()
    if not text:
        raise SampleProblem("empty_caption", f"{sample.label}: empty caption")
    return text


@dataclass(frozen=True)
class TarShard:
    """One WebDataset tar file."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    def fingerprint(self) -> str:
        """Name and size: a resumed run refuses shards that changed under it."""
        try:
            return f"{self.name}:{self.path.stat().st_size}"
        except OSError:
            return f"{self.name}:missing"

    def samples(self) -> Iterator[RawSample]:
        """Every sample in file order; a read error ends the shard with one `corrupt_shard` sample."""
        from webdataset.tariterators import base_plus_ext, tar_file_iterator

        seen: set[str] = set()
        index, group, error = 0, None, None
        try:
            stream = open(self.path, "rb")
        except OSError as exc:
            yield self._broken(0, f"cannot be read ({exc.strerror or exc})")
            return
        with stream:
            tracked = _TrackedReader(stream)
            files = tar_file_iterator(tracked)
            while True:
                try:
                    entry = next(files, None)
                except Exception as exc:  # tarfile.ReadError, EOFError, ...: truncated or not a tar at all
                    reason = _one_line(exc).split(" @ ")[0]  # webdataset appends " @ <file object>"
                    error = f"truncated or corrupt tar after {index} sample(s) ({reason})"
                    break
                if entry is None:
                    error = _unfinished(stream, tracked.position, index)
                    break
                key, ext = base_plus_ext(entry["fname"])
                if key is None:
                    continue
                ext = ext.lower()
                if group is not None and (key != group[0] or ext in group[1]):
                    yield self._sample(index, group, seen)
                    index, group = index + 1, None
                if group is None:
                    group = (key, {})
                group[1][ext] = entry["data"]
        if error is not None:  # the group being read when the tar broke may be incomplete: it is dropped
            yield self._broken(index, error)
        elif group is not None:
            yield self._sample(index, group, seen)

    def _broken(self, index: int, message: str) -> RawSample:
        return RawSample(self.name, index, "", problem=SampleProblem("corrupt_shard", f"{self.name}: {message}"))

    def _sample(self, index: int, group: tuple[str, dict], seen: set[str]) -> RawSample:
        key, files = group
        label = f"{self.name}/{key}"
        if key in seen:
            return RawSample(self.name, index, key, problem=SampleProblem("duplicate_key", f"{label}: duplicate key"))
        seen.add(key)
        image = next((files[e] for e in SHARD_IMAGE_EXTENSIONS if e in files), None)
        if image is None:
            problem = SampleProblem("missing_image", f"{label}: no image (.{', .'.join(SHARD_IMAGE_EXTENSIONS)})")
            return RawSample(self.name, index, key, problem=problem)
        if "txt" in files:
            return RawSample(self.name, index, key, image, files["txt"])
        if "json" in files:
            try:
                caption = json.loads(files["json"].decode("utf-8")).get("caption")
            except UnicodeDecodeError as exc:
                problem = SampleProblem("non_utf8_caption", f"{label}: .json is not UTF-8 ({exc.reason})")
                return RawSample(self.name, index, key, problem=problem)
            except (ValueError, AttributeError):
                caption = None
            if not isinstance(caption, str):
                problem = SampleProblem("missing_caption", f"{label}: .json has no string 'caption' field")
                return RawSample(self.name, index, key, problem=problem)
            return RawSample(self.name, index, key, image, caption)
        return RawSample(self.name, index, key, image, None)


@dataclass(frozen=True)
class JsonlShard:
    """Some lines of a `captions.jsonl` (a virtual shard); images are files relative to its folder."""

    root: Path
    numbers: tuple[int, ...]  # 1-based line numbers in the file (blank lines are not samples)
    lines: tuple[bytes, ...]

    @property
    def name(self) -> str:
        return f"{JSONL_NAME}:{self.numbers[0]}-{self.numbers[-1]}"

    def fingerprint(self) -> str:
        return f"{self.name}:{sum(len(line) for line in self.lines)}"

    def samples(self) -> Iterator[RawSample]:
        seen: set[str] = set()
        for i, (number, line) in enumerate(zip(self.numbers, self.lines)):
            yield self._sample(i, number, line, seen)

    def _sample(self, index: int, number: int, line: bytes, seen: set[str]) -> RawSample:
        where = f"{JSONL_NAME}:{number}"
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            problem = SampleProblem("non_utf8_caption", f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})")
            return RawSample(self.name, index, "", problem=problem)
        except ValueError:
            record = None
        image = record.get("image") if isinstance(record, dict) else None
        if not isinstance(image, str) or not image:
            problem = SampleProblem("bad_record", f"{where}: expected a JSON object with an 'image' path")
            return RawSample(self.name, index, "", problem=problem)
        if image in seen:
            problem = SampleProblem("duplicate_key", f"{where}: duplicate image {image}")
            return RawSample(self.name, index, image, problem=problem)
        seen.add(image)
        try:
            data = (self.root / image).read_bytes()
        except OSError as exc:
            problem = SampleProblem("missing_image", f"{where}: {image} cannot be read ({exc.strerror or exc})")
            return RawSample(self.name, index, image, problem=problem)
        caption = record.get("caption")
        if caption is not None and not isinstance(caption, str):
            problem = SampleProblem("missing_caption", f"{where}: 'caption' is not a string")
            return RawSample(self.name, index, image, problem=problem)
        return RawSample(self.name, index, image, data, caption)


def resolve_shards(spec: str | os.PathLike, *, min_count: int = 1) -> list[TarShard | JsonlShard]:
    """The shards of `spec`, in a fixed (sorted) order.

    Args:
        spec: a folder of `.tar` shards, a `.tar` file, a brace pattern (`/data/shard-{000000..000099}.tar`) or a
            folder holding `captions.jsonl`.
        min_count: cut a `captions.jsonl` into at least this many virtual shards when it has enough lines (ranks).

    Raises:
        ConfigError: nothing matches, a listed shard does not exist, or the folder holds no shards.
    """
    text = str(spec)
    if "{" in text:
        from braceexpand import braceexpand

        try:
            paths = [Path(p) for p in braceexpand(text)]
        except Exception as exc:  # unbalanced braces and the like
            raise ConfigError(f"data.shards {text}: not a valid brace pattern ({_one_line(exc)})") from None
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise ConfigError(f"data.shards: {len(missing)} of {len(paths)} shard(s) do not exist, first: {missing[0]}")
        return [TarShard(p) for p in paths]
    path = Path(text)
    if path.is_file() and path.name.endswith(".tar"):
        return [TarShard(path)]
    if not path.is_dir():
        raise ConfigError(f"data.shards {path}: no such folder or .tar file")
    tars = sorted(p for p in path.iterdir() if p.name.endswith(".tar") and not p.name.startswith(".") and p.is_file())
    if tars:
        return [TarShard(p) for p in tars]
    if (path / JSONL_NAME).is_file():
        return _jsonl_shards(path, min_count)
    raise ConfigError(f"data.shards {path}: no .tar shards and no {JSONL_NAME} in this folder")


def _jsonl_shards(root: Path, min_count: int) -> list[JsonlShard]:
    try:
        raw = (root / JSONL_NAME).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{root / JSONL_NAME}: cannot be read ({exc.strerror or exc})") from None
    numbered = [(n, line) for n, line in enumerate(raw.split(b"\n"), 1) if line.strip()]
    if not numbered:
        raise ConfigError(f"{root / JSONL_NAME}: no image-caption pairs (the file is empty)")
    size = max(1, min(JSONL_SHARD_LINES, math.ceil(len(numbered) / max(1, min_count))))
    chunks = [numbered[start : start + size] for start in range(0, len(numbered), size)]
    return [JsonlShard(root, tuple(n for n, _ in c), tuple(line for _, line in c)) for c in chunks]


def write_shard(path: str | os.PathLike, samples: Iterable[dict]) -> int:
    """Write a tar shard atomically (a temporary name, then a rename): never a half-written shard.

    Args:
        path: the shard's final path (`.../shard-000000.tar`).
        samples: dicts with "key" (no dots), "image" (encoded bytes), "ext" (jpg/png/webp), "caption" (str) and
            optionally "meta" (a dict stored as `<key>.json` together with the caption).

    Returns:
        The number of samples written. The bytes depend only on the samples (mtime 0, fixed owner), so rebuilding a
        shard from the same inputs gives the same file.
    """
    from webdataset import TarWriter

    count = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as stream:
        writer = TarWriter(stream, encoder=False, mtime=0.0, user="uae", group="uae")
        try:
            for sample in samples:
                writer.write(_record(sample))
                count += 1
        finally:  # also on errors: tarfile would otherwise flush into the closed file when collected
            writer.close()
    return count


def _record(sample: dict) -> dict:
    key, ext = sample["key"], sample["ext"]
    if "." in key or "/" in key or not key:
        raise ValueError(f"shard keys must be non-empty without '.' or '/', got {key!r}")
    if ext not in SHARD_IMAGE_EXTENSIONS:
        raise ValueError(f"image extension must be one of {SHARD_IMAGE_EXTENSIONS}, got {ext!r}")
    record = {"__key__": key, ext: bytes(sample["image"]), "txt": sample["caption"].encode("utf-8")}
    if sample.get("meta") is not None:
        meta = {"caption": sample["caption"], **sample["meta"]}
        record["json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return record


class _TrackedReader:
    """A file wrapper that counts the bytes tarfile has read."""

    def __init__(self, stream):
        self.stream, self.position = stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.position += len(data)
        return data


def _unfinished(stream, position: int, index: int) -> str | None:
    """Why a tar that tarfile read to its end without an error is still broken, or None.

    tarfile ends a stream quietly at a cut or damaged header after the first member, which would drop the rest
    of a shard unnoticed. A complete tar ends with two zero blocks (the end-of-archive marker) and nothing but zero
    padding follows where the reader stopped.
    """
    stream.seek(position)
    rest = stream.read()
    size = position + len(rest)
    if rest.strip(b"\0"):
        return f"corrupt tar: a damaged header after {index} sample(s) hides {len(rest)} more bytes"
    stream.seek(max(0, size - 1024))
    if size % 512 or size < 1024 or stream.read(1024).strip(b"\0"):
        return f"truncated tar: no end-of-archive marker after {index} sample(s) ({size} bytes)"
    return None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
