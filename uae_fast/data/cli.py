"""`uae-fast data build` and `uae-fast data check`: stage 1's image-caption shards."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_data_parser", "cmd_data"]

EXIT_PROBLEMS = 1


def add_data_parser(sub) -> None:
    p = sub.add_parser(
        "data",
        help="build and check image-caption shards (stage 1's long-caption data)",
        description="Build WebDataset shards of (image, long caption) pairs with the captioner, and check them.",
    )
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    b = dsub.add_parser(
        "build",
        help="caption images into shards",
        description="Caption every image of a folder (or the demo photographs) with the captioner's long-caption "
        "prompt and write WebDataset shards (shard-NNNNNN.tar: <key>.jpg|png|webp, <key>.txt, <key>.json) plus "
        "stats.json and stats.html. Rerunning with the same settings resumes: finished shards are skipped, and "
        "shard i always holds the same images (of the sorted file list), so a rebuilt shard is identical.",
        epilog="Example: uae-fast data build --demo --preset tiny --out shards/ --shard-size 2",
    )
    source = b.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, metavar="DIR", help="folder of images to caption")
    source.add_argument("--demo", action="store_true", help="the bundled demo photographs (scikit-image)")
    b.add_argument("--out", type=Path, required=True, metavar="SHARDS", help="output folder of the shards (created)")
    b.add_argument("--preset", default="tiny", help="captioner: 'tiny', 'uae-3b' or a checkpoint folder (tiny)")
    b.add_argument("--shard-size", type=int, default=1000, metavar="N", help="images per shard (default: 1000)")
    b.add_argument("--min-words", type=int, default=8, metavar="N", help="drop captions of fewer words (default: 8)")
    b.add_argument(
        "--max-repetition",
        type=float,
        default=0.5,
        metavar="R",
        help="drop captions whose repetition ratio exceeds R; the ratio is 1 - distinct/all word 3-grams of the "
        "lowercased caption (0: no 3-gram repeats, near 1: one phrase looping; default: 0.5)",
    )
    b.add_argument("--batch-size", type=int, default=8, metavar="B", help="images per captioner call (default: 8)")
    b.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default: 0)")
    b.add_argument("--max-new-tokens", type=int, default=None, metavar="N", help="caption length limit (preset's)")
    b.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the preset's, 0.7)")

    c = dsub.add_parser(
        "check",
        help="check shards for problems",
        description="Read every sample: corrupt or truncated shards, images that fail to decode, missing, empty or "
        "non-UTF-8 captions, duplicate keys and duplicate images (same decoded pixels). Exit status 0 when clean "
        "(or at most --allow problems), 1 otherwise.",
    )
    c.add_argument("shards", metavar="SHARDS", help="folder of .tar shards, a brace pattern or a captions.jsonl folder")
    c.add_argument("--allow", type=int, default=0, metavar="N", help="exit 0 with up to N problems (default: 0)")
    c.add_argument("--report", type=Path, metavar="FILE", help="also write the full report as JSON")


def cmd_data(args: argparse.Namespace) -> int:
    """Run `data build` or `data check`; returns the exit status (UAEErrors propagate to the CLI's one-liner)."""
    if args.data_command == "build":
        return _build(args)
    return _check(args)


def _build(args) -> int:
    from .build import BuildSettings, build_shards

    settings = BuildSettings(
        preset=args.preset,
        shard_size=args.shard_size,
        min_words=args.min_words,
        max_repetition=args.max_repetition,
        batch_size=args.batch_size,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
    )
    stats = build_shards(args.out, images=args.images, demo=args.demo, settings=settings)
    if stats["count"] == 0:
        print(f"uae-fast: warning: every image was skipped; see {args.out / 'stats.html'}", file=sys.stderr)
    print(
        f"wrote {stats['count']} pair(s) in {stats['shards']} shard(s) to {args.out} "
        f"({stats['shards_resumed']} already done, {len(stats['skipped'])} image(s) skipped); "
        f"see stats.json and stats.html",
        file=sys.stderr,
    )
    return 0


def _check(args) -> int:
    from ..errors import ConfigError
    from ..io import write_text_atomic
    from .check import check_shards, format_report

    if args.allow < 0:
        raise ConfigError(f"--allow must be >= 0, got {args.allow}")
    report = check_shards(args.shards)
    print(format_report(report))
    if args.report is not None:
        write_text_atomic(args.report, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    return 0 if len(report["problems"]) <= args.allow else EXIT_PROBLEMS
