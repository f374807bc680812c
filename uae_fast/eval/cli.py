"""``uae-fast bench unified`` and ``uae-fast bench score``: the Unified-Bench commands.

Registered into the main parser by :func:`add_bench_parser`. Heavy imports (torch, transformers) happen only when a
command runs, so ``uae-fast --help`` stays instant. Backbones come from ``--backbones`` (``tiny``, a JSON/YAML file
mapping name → folder, or ``name=FOLDER`` items) or the ``UAE_FAST_BACKBONES`` environment variable (same forms);
nothing is ever downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import ConfigError

__all__ = ["add_bench_parser", "cmd_bench", "parse_backbones", "BACKBONES_ENV"]

BACKBONES_ENV = "UAE_FAST_BACKBONES"
_MODELS = ("clip", "dinov2", "dinov3", "longclip")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` (with ``unified`` and ``score``) to the main parser's subcommands."""
    from .. import cli as base

    bench = subparsers.add_parser(
        "bench",
        help="Unified-Bench: image → caption → image, scored by CLIP/DINOv2/DINOv3/LongCLIP",
        description="Unified-Bench (Protocol 1 of the UAE paper): per-backbone score = mean cosine × 100, "
        "Overall = unweighted mean of the four backbones.",
    )
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH_COMMAND")

    uni = sub.add_parser(
        "unified",
        help="caption, regenerate and score images",
        description="Caption every image, regenerate it from its caption and score the pair. Writes "
        "unified_bench.json, unified_bench.html, sources/ and recon/ into --out.",
        epilog="Example: uae-fast bench unified --demo --preset tiny --backbones tiny --out bench/",
    )
    src = uni.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", type=Path, metavar="PATH", help="image files or folders")
    src.add_argument("--demo", action="store_true", help="the bundled demo photographs (scikit-image)")
    uni.add_argument("--out", type=Path, required=True, help="output folder (created)")
    uni.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed in the JSON)")
    uni.add_argument("--batch-size", type=int, default=4, help="images per model call (default: 4)")
    _add_backbone_opts(uni)
    base._add_model(uni)
    g = uni.add_argument_group("captioning")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: preset's)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="caption length limit (default: preset's)")
    base._add_generate_opts(uni)

    score = sub.add_parser(
        "score",
        help="score an existing folder of reconstructions",
        description="Score reconstructions against references, matched by exact file name, then stem, then "
        "recon_<stem>. Writes the JSON to --output and an HTML report beside it (same name, .html).",
        epilog="Example: uae-fast bench score --image_path recon/ --ref_image_path refs/ --backbones tiny "
        "--output scores.json",
    )
    score.add_argument("--image_path", "--image-path", type=Path, required=True, help="folder of reconstructions")
    score.add_argument("--ref_image_path", "--ref-image-path", type=Path, required=True, help="folder of references")
    score.add_argument("--output", type=Path, required=True, help="results JSON path (its folder is created)")
    score.add_argument("--batch-size", type=int, default=16, help="pairs per feature batch (default: 16)")
    score.add_argument(
        "--on-size-mismatch",
        choices=("score", "skip", "error"),
        default="score",
        help="pairs whose aspect ratios differ: score and list them (default), skip them, or stop",
    )
    score.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    _add_backbone_opts(score)
    return bench


def _add_backbone_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backbones")
    g.add_argument("--models", nargs="+", choices=_MODELS, default=list(_MODELS), help="backbones to score with")
    g.add_argument(
        "--backbones",
        nargs="+",
        default=None,
        metavar="SPEC",
        help="'tiny' (random test backbones), a JSON/YAML file {name: folder}, or name=FOLDER items "
        f"(default: ${BACKBONES_ENV}, or tiny with --preset tiny)",
    )


def parse_backbones(spec: list[str] | None, models: list[str], *, default_tiny: bool = False) -> dict[str, str]:
    """Resolve ``--backbones`` into {model: folder or 'tiny'} for every requested model.

    Raises:
        ConfigError: No spec anywhere, an unreadable mapping file, a malformed item, or a model left without a path.
    """
    if not spec:
        env = os.environ.get(BACKBONES_ENV)
        spec = env.split() if env else (["tiny"] if default_tiny else None)
    if not spec:
        raise ConfigError(
            f"no backbone folders: pass --backbones (tiny, a JSON/YAML file, or name=FOLDER ...) or set {BACKBONES_ENV}"
        )
    mapping: dict[str, str] = {}
    for item in spec:
        if item == "tiny":
            mapping.update({m: "tiny" for m in models})
        elif "=" in item:
            name, _, path = item.partition("=")
            if name not in _MODELS or not path:
                raise ConfigError(f"--backbones item {item!r}: expected NAME=FOLDER with NAME in {', '.join(_MODELS)}")
            mapping[name] = path
        else:
            mapping.update(_read_mapping(Path(item)))
    missing = [m for m in models if m not in mapping]
    if missing:
        raise ConfigError(f"--backbones gives no folder for {', '.join(missing)} (or drop them from --models)")
    return {m: mapping[m] for m in models}


def _read_mapping(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise ConfigError(f"--backbones {path}: no such file (expected 'tiny', NAME=FOLDER, or a JSON/YAML file)")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # JSON/YAML syntax errors, undecodable bytes
        raise ConfigError(f"--backbones {path}: cannot parse ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ConfigError(f"--backbones {path}: expected a mapping of backbone name to folder")
    unknown = [k for k in data if k not in _MODELS]
    if unknown:
        raise ConfigError(f"--backbones {path}: unknown backbone(s) {', '.join(unknown)}; known: {', '.join(_MODELS)}")
    return dict(data)


def _reward(args, paths: dict[str, str]):
    from ..models.components import default_device
    from ..rewards import ReconstructionReward, load_backbones

    device = args.device or default_device()
    # Weight 1 each: the bench reads the per-backbone cosines, not the weighted sum.
    return ReconstructionReward(load_backbones(paths, device=device), {m: 1.0 for m in paths}, cache_size=0)


def _summary_line(results: dict) -> str:
    table = results["unified_bench"]
    return "  ".join(f"{k} {v:.2f}" for k, v in table.items())


def cmd_unified(args) -> None:
    from .. import cli as base
    from .unified import run_unified

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    paths = parse_backbones(args.backbones, args.models, default_tiny=args.preset == "tiny")
    # Checked before the (slow) model load so a typo fails fast.
    args.images = args.images or []
    image_paths = base._image_paths(args)
    reward = _reward(args, paths)
    uae = base._load_model(args)
    skipped: list = []  # filled by _image_batches as it goes; run_unified reads it at the end
    with base._progress(base._total(args, image_paths), "bench unified") as bar:
        results, json_path, html_path = run_unified(
            uae,
            reward,
            base._image_batches(args, image_paths, skipped),
            args.out,
            seed=args.seed,
            caption_kwargs=base._caption_kwargs(args),
            generate_kwargs=base._generate_kwargs(args),
            skipped=skipped,
            extra={"preset": str(args.preset), "backbones": paths},
            progress=bar.update,
        )
    for s in results["skipped"]:
        print(f"skipped {s['file']}: {s['reason']}", file=sys.stderr)
    print(_summary_line(results))
    print(f"wrote {json_path} and {html_path}", file=sys.stderr)


def cmd_score(args) -> None:
    from ..io import ensure_output_dir
    from .bench import score_folders, write_results

    paths = parse_backbones(args.backbones, args.models)
    for flag, folder in (("--image_path", args.image_path), ("--ref_image_path", args.ref_image_path)):
        if not folder.is_dir():
            raise ConfigError(f"{flag} {folder}: no such folder")
    ensure_output_dir(args.output.parent if str(args.output.parent) else Path("."), option="--output folder")
    reward = _reward(args, paths)
    from .. import cli as base

    with base._progress(None, "bench score") as bar:
        results = score_folders(
            args.image_path.resolve(),
            args.ref_image_path.resolve(),
            reward,
            batch_size=args.batch_size,
            on_size_mismatch=args.on_size_mismatch,
            progress=bar.update,
        )
    results["backbones"] = paths
    json_path, html_path = write_results(results, args.output, title="Unified-Bench (score)")
    for s in results["skipped"]:
        print(f"skipped {s['file']}: {s['reason']}", file=sys.stderr)
    print(_summary_line(results))
    print(f"wrote {json_path} and {html_path}", file=sys.stderr)


def cmd_bench(args) -> None:
    """Entry point of ``uae-fast bench``: dispatch to the subcommand."""
    {"unified": cmd_unified, "score": cmd_score}[args.bench_command](args)
