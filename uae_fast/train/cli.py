"""`uae-fast train`: run a training stage from a shipped config or a YAML file, with `key=value` overrides."""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["add_train_parser", "cmd_train"]

# `--preset NAME [--stage STAGE]` is shorthand for the shipped config of that model and stage: `<stage>_<suffix>`.
PRESET_CONFIGS = {"tiny": "tiny", "uae-3b": "uae3b"}
STAGE_NAMES = {"g4u": "stage 2a: GRPO on the captioner", "u4g": "stage 2b: Flow-GRPO on the decoder",
               "unified": "Unified-GRPO: 2a then 2b (or alternating) on one model",
               "pretrain": "stage 1: rectified-flow pretraining of the decoder on long captions",
               "cold_start": "the cold start: differentiable reconstruction, both adapters"}  # fmt: skip


def add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train (stage 1, the cold start, stage 2a, stage 2b or the Unified-GRPO schedule)",
        description="Train a UAE. Settings come from --config (a YAML file or a shipped config name) or --preset, "
        "then from KEY=VALUE overrides with dotted keys, e.g. max_steps=4 decoder.steps=10 lora.r=16.",
        epilog="Examples: uae-fast train --preset tiny --out runs/tiny max_steps=20; "
        "uae-fast train --preset tiny --stage u4g --out runs/u4g",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="YAML file, or a shipped config name (see --list-configs)")
    source.add_argument("--preset", choices=sorted(PRESET_CONFIGS), help="the shipped config of a preset model")
    source.add_argument("--list-configs", action="store_true", help="print the shipped configs and exit")
    p.add_argument(
        "--stage",
        choices=sorted(STAGE_NAMES),
        default="g4u",
        help="with --preset: which stage's shipped config ("
        + "; ".join(f"{k}: {v}" for k, v in STAGE_NAMES.items())
        + "); default g4u",
    )
    p.add_argument("--out", help="run folder: checkpoints, metrics.jsonl, tensorboard/, final/, report/")
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="continue a run: the latest checkpoint in --out (no value; starts fresh when there is none) or a "
        "checkpoint folder",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier run in --out (a run folder is refused otherwise)"
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (dotted keys)")


def cmd_train(args: argparse.Namespace) -> None:
    from ..errors import ConfigError
    from . import load_train_config, shipped_configs, train
    from .run_folder import prepare_run_folder

    if args.list_configs:
        for name, path in shipped_configs().items():
            print(f"{name}\t{path}")
        return
    overrides = list(args.overrides)
    for text in overrides:
        if "=" not in text:
            raise ConfigError(f"unexpected argument {text!r}: overrides look like key=value (e.g. max_steps=4)")
    if args.out is not None:
        overrides.append(f"output_dir={args.out}")
    if args.resume is not None:
        overrides.append(f"resume={args.resume}")
    if args.overwrite:
        overrides.append("overwrite=true")
    if args.config and args.stage != "g4u":
        raise ConfigError("--stage picks a preset's shipped config; with --config, set stage=... as an override")
    config = load_train_config(args.config or f"{args.stage}_{PRESET_CONFIGS[args.preset]}", overrides)
    if not config.output_dir:
        raise ConfigError("no run folder: pass --out RUN_DIR (or output_dir=... in the config)")
    # Before the libraries load (seconds): a folder holding a run is refused at once (under a launcher, rank 0's
    # check in `train` does it: the other ranks would race with rank 0 creating the run).
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        prepare_run_folder(config.output_dir, resume=config.resume, overwrite=config.overwrite, check_only=True)
    _quiet()
    run_dir = train(config)
    if int(os.environ.get("RANK", "0")):
        return
    outputs = ["metrics.jsonl", "checkpoints", *(["final/"] if config.save_final_model else []),
               *(["report/index.html"] if config.report_images else [])]  # fmt: skip
    print(f"uae-fast: run folder {run_dir} ({', '.join(outputs)})", file=sys.stderr)


def _quiet() -> None:
    import warnings

    from ..cli import quiet_libraries

    quiet_libraries()
    # PEFT still calls a transformers method deprecated in 5.x; the warning says nothing the user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
