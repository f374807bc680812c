"""`uae-fast data check`: read every sample of a shard set once and list what training would skip or trip over.

Problems: corrupt or truncated shards, samples without an image or a caption, images that fail to decode (through
the training decoder), empty or non-UTF-8 captions, duplicate keys (within and across shards) and duplicate images
(the same decoded pixels under two keys).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import ImageLoadError
from .shard_io import RawSample, SampleProblem, resolve_shards, sample_caption

__all__ = ["PROBLEM_KINDS", "check_shards", "format_report"]

PROBLEM_KINDS = (
    "corrupt_shard",
    "corrupt_image",
    "missing_image",
    "missing_caption",
    "bad_record",
    "empty_caption",
    "non_utf8_caption",
    "duplicate_key",
    "duplicate_image",
)
_DECODE_BATCH = 32


def check_shards(spec: str | Path, *, decoder: str = "auto") -> dict:
    """Check the shards of `spec` (a folder of .tar, a brace pattern, a .tar or a captions.jsonl folder).

    Returns:
        {"shards", "samples", "ok", "problems": [{"kind", "where", "detail"}], "counts": {kind: n}}.

    Raises:
        ConfigError: `spec` names no shards.
    """
    from ..train.data import decode_named
    from .decode import ImageDecoder

    shards = resolve_shards(spec)
    problems: list[dict] = []
    keys: dict[str, str] = {}  # key -> the shard that had it first
    hashes: dict[str, str] = {}  # pixel hash -> the first sample with those pixels
    samples = ok = 0
    with ImageDecoder(decoder) as dec:
        pending: list[tuple[RawSample, bool]] = []  # (sample, caption ok), waiting for a batched decode

        def flush() -> None:
            nonlocal ok
            decoded = decode_named(dec, [s.image for s, _ in pending], [s.label for s, _ in pending])
            for (sample, caption_ok), pixels in zip(pending, decoded):
                if isinstance(pixels, ImageLoadError):
                    problems.append(_problem("corrupt_image", sample.label, str(pixels)))
                    continue
                digest = hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()
                if digest in hashes:
                    detail = f"{sample.label}: same pixels as {hashes[digest]}"
                    problems.append(_problem("duplicate_image", sample.label, detail))
                    continue
                hashes[digest] = sample.label
                ok += caption_ok
            pending.clear()

        for shard in shards:
            for sample in shard.samples():
                if sample.problem is None or sample.problem.kind != "corrupt_shard":
                    samples += 1
                caption_ok = _caption_ok(sample, problems)
                if sample.problem is not None or not _new_key(sample, shard.name, keys, problems):
                    continue
                pending.append((sample, caption_ok))
                if len(pending) >= _DECODE_BATCH:
                    flush()
        if pending:
            flush()
    counts = {kind: 0 for kind in PROBLEM_KINDS}
    for p in problems:
        counts[p["kind"]] += 1
    return {"shards": len(shards), "samples": samples, "ok": ok, "problems": problems, "counts": counts}


def _caption_ok(sample: RawSample, problems: list[dict]) -> bool:
    """Record the sample's caption or structural problem, if any; True when its caption is usable."""
    try:
        sample_caption(sample)
    except SampleProblem as problem:
        problems.append(_problem(problem.kind, sample.label, str(problem)))
        return False
    return True


def _new_key(sample: RawSample, shard: str, keys: dict[str, str], problems: list[dict]) -> bool:
    """False (and a duplicate_key problem) when an earlier shard already had the sample's key."""
    if sample.key in keys:
        detail = f"{sample.label}: duplicate key (first in {keys[sample.key]})"
        problems.append(_problem("duplicate_key", sample.label, detail))
        return False
    keys[sample.key] = shard
    return True


def _problem(kind: str, where: str, detail: str) -> dict:
    return {"kind": kind, "where": where, "detail": detail}


def format_report(report: dict, *, show: int = 10) -> str:
    """A few lines for a terminal: totals, problem counts, the first `show` problems."""
    total = len(report["problems"])
    lines = [
        f"checked {report['samples']} sample(s) in {report['shards']} shard(s): {report['ok']} ok, {total} problem(s)"
    ]
    counts = ", ".join(f"{kind} {n}" for kind, n in report["counts"].items() if n)
    if counts:
        lines.append(f"  {counts}")
    for p in report["problems"][:show]:
        lines.append(f"  {p['kind']}: {p['detail']}")
    if total > show:
        lines.append(f"  ... and {total - show} more (see --report)")
    return "\n".join(lines)
