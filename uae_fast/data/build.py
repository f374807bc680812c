"""`uae-fast data build`: caption a folder of images (or the demo photographs) with the one captioner and write
LongCap-style WebDataset shards, resumably.

Shard i always holds images i·N .. i·N+N-1 of the sorted file list, captioned in fixed batches with a seed drawn
from (seed, i, batch): a finished shard never needs redoing and a redone one is byte-identical. Each shard is
written to a temporary name and renamed; its record (captions' lengths, skipped files) lands in `.build/` first,
so a `shard-*.tar` that exists is complete and accounted for. The run ends with `stats.json` and `stats.html`.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import math
import re
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ConfigError, ImageLoadError
from ..io import write_text_atomic
from .shard_io import write_shard

__all__ = ["BuildSettings", "build_shards", "repetition_ratio", "WORD_BINS"]

# Caption length histogram edges (words): LongCap captions run ~250 words.
WORD_BINS = (0, 10, 25, 50, 100, 150, 200, 250, 300, 400, 500)
_KEEP_EXT = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
_RECORDS = ".build"


@dataclass(frozen=True)
class BuildSettings:
    preset: str = "tiny"
    shard_size: int = 1000
    min_words: int = 8
    max_repetition: float = 0.5
    batch_size: int = 8
    seed: int = 0
    max_new_tokens: int | None = None  # None: the preset's (the official 512 for uae-3b)
    temperature: float | None = None  # None: the preset's (0.7, the official sampling)

    def __post_init__(self):
        if self.shard_size < 1:
            raise ConfigError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.min_words < 0:
            raise ConfigError(f"--min-words must be >= 0, got {self.min_words}")
        if not 0 <= self.max_repetition <= 1:
            raise ConfigError(f"--max-repetition must be in [0, 1], got {self.max_repetition}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")


def repetition_ratio(caption: str) -> float:
    """1 − distinct / all word 3-grams of the lowercased caption: 0 when no 3-gram repeats, near 1 for a caption
    looping one phrase (a degenerate sample); 0 for fewer than 3 words."""
    words = caption.lower().split()
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def _sources(images: Path | None, demo: bool) -> list[tuple[str, object]]:
    """(name, Path or PNG bytes) of every input, sorted by name: the order shard membership follows."""
    if demo:
        from .demo import demo_images

        out = []
        for item in demo_images():
            buffer = io.BytesIO()
            item.image.save(buffer, format="PNG")  # lossless: the pixels training sees
            out.append((f"{item.name}.png", buffer.getvalue()))
        return out
    from .images import list_image_files

    return [(p.name, p) for p in list_image_files(images)]


def _key(index: int, name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", Path(name).stem)[:64]
    return f"{index:07d}-{stem}"


def _settings_record(settings: BuildSettings, sources: list) -> dict:
    names = "\n".join(name for name, _ in sources).encode("utf-8", "surrogateescape")
    return {**asdict(settings), "images": len(sources), "names_sha256": hashlib.sha256(names).hexdigest()}


def _check_settings(out: Path, record: dict) -> None:
    path = out / "build.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and old != record:
            changed = next(k for k in record if old.get(k) != record[k])
            raise ConfigError(
                f"{out} holds shards built with other settings ({changed}: {old.get(changed)!r} then, "
                f"{record[changed]!r} now); use another --out or the same settings to resume"
            )
    write_text_atomic(path, json.dumps(record, indent=1) + "\n")


class _Builder:
    def __init__(self, out: Path, settings: BuildSettings, sources: list):
        self.out, self.settings, self.sources = out, settings, sources
        self.uae = None  # loaded only when a shard is left to caption
        from .decode import ImageDecoder

        self.decoder = ImageDecoder("auto")

    def shard_path(self, i: int) -> Path:
        return self.out / f"shard-{i:06d}.tar"

    def record_path(self, i: int) -> Path:
        return self.out / _RECORDS / f"shard-{i:06d}.json"

    def done(self, i: int) -> dict | None:
        """The record of shard i when its tar exists (a finished shard), else None."""
        if not self.shard_path(i).is_file():
            return None
        try:
            return json.loads(self.record_path(i).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # a record lost by hand: rebuild the shard (the same bytes) to get it back

    def build(self, i: int, bar) -> dict:
        from ..train.data import decode_named

        n = self.settings.shard_size
        chunk = list(enumerate(self.sources[i * n : (i + 1) * n], start=i * n))
        skipped, good = [], []
        for start in range(0, len(chunk), self.settings.batch_size):
            part = chunk[start : start + self.settings.batch_size]
            blobs = [_read(src) for _, (_, src) in part]
            decoded = decode_named(self.decoder, blobs, [name for _, (name, _) in part])
            for (index, (name, src)), blob, pixels in zip(part, blobs, decoded):
                if isinstance(pixels, ImageLoadError):
                    skipped.append({"image": name, "reason": str(pixels)})
                else:
                    good.append((index, name, src, blob))
        samples, words = [], []
        for b, start in enumerate(range(0, len(good), self.settings.batch_size)):
            batch = good[start : start + self.settings.batch_size]
            for (index, name, src, blob), caption in zip(batch, self._caption([g[3] for g in batch], i, b)):
                reason = self._reject(caption)
                if reason:
                    skipped.append({"image": name, "reason": f"{name}: {reason}"})
                    continue
                ext = _KEEP_EXT.get(Path(name).suffix.lower())
                image = blob if ext else _png(blob)
                samples.append(
                    {"key": _key(index, name), "image": image, "ext": ext or "png", "caption": caption.strip(),
                     "meta": {"source": name}}
                )  # fmt: skip
                words.append(len(caption.split()))
            bar.update(len(batch))
        bar.update(len(chunk) - len(good))
        record = {"shard": self.shard_path(i).name, "written": len(samples), "words": words, "skipped": skipped}
        self.record_path(i).parent.mkdir(exist_ok=True)
        write_text_atomic(self.record_path(i), json.dumps(record) + "\n")
        write_shard(self.shard_path(i), samples)  # atomic: the tar appears complete or not at all
        return record

    def _caption(self, blobs: list[bytes], shard: int, batch: int) -> list[str]:
        if self.uae is None:
            from .. import api
            from ..cli import quiet_libraries

            quiet_libraries()
            self.uae = api.load(self.settings.preset, seed=0)
        s = self.settings
        seed = (s.seed * 1_000_003 + shard * 1_009 + batch) % (1 << 62)
        return self.uae.caption(blobs, seed=seed, max_new_tokens=s.max_new_tokens, temperature=s.temperature)

    def _reject(self, caption: str) -> str | None:
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError:
            return "the caption is not valid Unicode"
        words = len(caption.split())
        if words == 0:
            return "empty caption"
        if words < self.settings.min_words:
            return f"caption too short ({words} words < --min-words {self.settings.min_words})"
        ratio = repetition_ratio(caption)
        if ratio > self.settings.max_repetition:
            return f"caption repeats itself (repetition {ratio:.2f} > --max-repetition {self.settings.max_repetition})"
        return None


def _read(source) -> bytes:
    if isinstance(source, Path):
        try:
            return source.read_bytes()
        except OSError:
            return source  # decode_named reads it again and reports why it cannot
    return source


def _png(blob: bytes) -> bytes:
    """A format shards do not carry (BMP, TIFF, GIF, ...) stored losslessly as PNG, as load_image decodes it."""
    from .images import load_image

    buffer = io.BytesIO()
    load_image(blob).save(buffer, format="PNG")
    return buffer.getvalue()


def build_shards(
    out: str | Path, *, images: str | Path | None = None, demo: bool = False, settings: BuildSettings | None = None
) -> dict:
    """Caption `images` (a folder) or the demo photographs into shards under `out`; resumes an earlier build.

    Returns:
        The statistics also written to `out/stats.json` (and `out/stats.html`).

    Raises:
        ConfigError: bad settings, or `out` holds a build with other settings.
        ImageLoadError: the image folder is missing or empty.
    """
    from tqdm import tqdm

    settings = settings or BuildSettings()
    if (images is None) == (not demo):
        raise ConfigError("give --images DIR or --demo")
    sources = _sources(Path(images) if images is not None else None, demo)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, _settings_record(settings, sources))
    builder = _Builder(out, settings, sources)
    count = math.ceil(len(sources) / settings.shard_size)
    records, todo = {}, []
    for i in range(count):
        record = builder.done(i)
        if record is None:
            todo.append(i)
        else:
            records[i] = record
    finished = sum(min(settings.shard_size, len(sources) - i * settings.shard_size) for i in records)
    bar = tqdm(total=len(sources), initial=finished, desc="data build", unit="img", disable=None, file=sys.stderr)
    with bar:
        for i in todo:
            records[i] = builder.build(i, bar)
            if bar.disable:  # no terminal (job logs): one plain line per shard instead of the bar
                r = records[i]
                print(f"data build: {r['shard']} ({i + 1}/{count}): {r['written']} pair(s), "
                      f"{len(r['skipped'])} skipped", file=sys.stderr)  # fmt: skip
    stats = _stats([records[i] for i in range(count)], len(sources), resumed=count - len(todo), settings=settings)
    write_text_atomic(out / "stats.json", json.dumps(stats, indent=1, ensure_ascii=False) + "\n")
    write_text_atomic(out / "stats.html", _html(stats))
    return stats


def _stats(records: list[dict], inputs: int, *, resumed: int, settings: BuildSettings) -> dict:
    words = [w for r in records for w in r["words"]]
    skipped = [s for r in records for s in r["skipped"]]
    edges = list(WORD_BINS) + [None]
    histogram = [
        {"from": lo, "to": hi, "count": sum(1 for w in words if w >= lo and (hi is None or w < hi))}
        for lo, hi in zip(edges[:-2], edges[1:-1])
    ] + [{"from": edges[-2], "to": None, "count": sum(1 for w in words if w >= edges[-2])}]
    reasons: dict[str, int] = {}
    for s in skipped:
        kind = re.sub(r" \(.*", "", s["reason"].split(": ", 1)[-1])  # "caption too short", "not an image", ...
        reasons[kind] = reasons.get(kind, 0) + 1
    return {
        "images": inputs,
        "count": len(words),
        "shards": len(records),
        "shards_resumed": resumed,
        "words": {
            "mean": statistics.fmean(words) if words else 0.0,
            "median": statistics.median(words) if words else 0,
            "min": min(words, default=0),
            "max": max(words, default=0),
        },
        "histogram": histogram,
        "skipped": skipped,
        "skipped_by_reason": reasons,
        "settings": asdict(settings),
    }


def _html(stats: dict) -> str:
    """A one-file page: totals, the caption-length histogram as CSS bars, the skipped files."""
    top = max((b["count"] for b in stats["histogram"]), default=0) or 1
    rows = "".join(
        f"<tr><td>{b['from']}–{'' if b['to'] is None else b['to'] - 1}</td><td>{b['count']}</td>"
        f"<td><div class=bar style='width:{300 * b['count'] / top:.0f}px'></div></td></tr>"
        for b in stats["histogram"]
    )
    skipped = "".join(
        f"<tr><td>{html.escape(s.get('image', ''))}</td><td>{html.escape(s['reason'])}</td></tr>"
        for s in stats["skipped"]
    )
    w = stats["words"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>data build statistics</title>
<style>body{{font-family:sans-serif;margin:2em}}td{{padding:2px 8px}}.bar{{height:12px;background:#4a7}}</style>
</head><body><h1>data build statistics</h1>
<p>{stats["count"]} image-caption pairs in {stats["shards"]} shard(s) from {stats["images"]} input image(s);
{len(stats["skipped"])} skipped. Caption words: mean {w["mean"]:.1f}, median {w["median"]}, min {w["min"]},
max {w["max"]}.</p>
<h2>Caption length (words)</h2><table>{rows}</table>
<h2>Skipped ({len(stats["skipped"])})</h2><table><tr><th>file</th><th>why</th></tr>{skipped}</table>
</body></html>
"""
