"""Does a training config learn? The ten-seed table of the README's "Does it learn?" section, for any config.

Each seed is trained twice through the public API, once as is and once with `negate_advantages=true` (a control
that must not improve the reward). σ₀ = the step-1 value of `--std-metric` (default `<metric>_std`, the within-group
reward std), Δ = mean of `--metric` over the last `--window` steps − over the first. A seed passes when
Δ(+) ≥ `--min-gain` σ₀ (and Δ(+) > 0) and Δ(+) − Δ(−) ≥ `--min-gap` σ₀. Stage 2a's criterion is the default
(1.5, 3.0); stage 2b's is `--min-gain 0 --min-gap 5`. One torch thread, one run at a time.

Stage 1 has no negated control: its evaluation is its own control (the loss with the images' own captions against
the captions shuffled, same noise and σ). `--criterion conditioning` trains each seed once and passes it when the
paired z of that gain (`eval/caption_gain_z`) is within ±`--max-start-z` at step 0 and ≥ `--min-end-z` at the end.

Usage: `python scripts/seed_table.py --config g4u_tiny --seeds 5000-5009 [--metric reward] [--steps N] [key=value ...]`
A metric logged on some steps only (the unified schedule's `g4u/reward`, `u4g/reward`) is measured over the steps
that log it; several metrics are judged on the same pair of runs, each with its own thresholds, and a seed passes when
all do: `--config unified_tiny --metric g4u/reward,u4g/reward --min-gain 1.5,0 --min-gap 3,5`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


def parse_seeds(text: str) -> list[int]:
    """`5000-5009`, `0,3,7` or a mix: `0-4,1000`."""
    seeds = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        seeds.extend(range(int(first), int(last or first) + 1))
    return seeds


def run(config: str, seed: int, negate: bool, overrides: list[str]) -> list[dict]:
    """Per-step metrics of one training run (in a temporary folder, deleted afterwards)."""
    import uae_fast
    from uae_fast.train import load_train_config
    from uae_fast.train.metrics import read_metrics

    with tempfile.TemporaryDirectory(prefix="seed_table_") as tmp:
        settings = [
            f"output_dir={tmp}/run",
            f"seed={seed}",
            f"negate_advantages={str(negate).lower()}",
            "save_final_model=false",
            "report_images=0",
            "tensorboard=false",
            "save_steps=0",
            *overrides,
        ]
        run_dir = uae_fast.train(load_train_config(config, settings))
        return read_metrics(Path(run_dir) / "metrics.jsonl")


def delta(rows: list[dict], metric: str, window: int) -> float:
    """Over the steps that log `metric` (all of them, or one stage's steps of the unified schedule)."""
    values = [row[metric] for row in rows if metric in row]
    return statistics.mean(values[-window:]) - statistics.mean(values[:window])


def first(rows: list[dict], metric: str) -> float:
    """`metric` at the first step that logs it (σ₀ of a stage that starts mid-run)."""
    return next(row[metric] for row in rows if metric in row)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="g4u_tiny", help="shipped config name or YAML path")
    parser.add_argument("--seeds", default="5000-5009", help="e.g. 5000-5009 or 0,3,7")
    parser.add_argument("--metric", default="reward", help="metric key whose rise is measured (several: a,b)")
    parser.add_argument("--std-metric", default=None, help="σ₀'s metric key(s) (default: <metric>_std)")
    parser.add_argument("--steps", type=int, default=None, help="max_steps (default: the config's)")
    parser.add_argument("--window", type=int, default=5, help="steps averaged at each end")
    parser.add_argument("--min-gain", default="1.5", help="pass needs Δ(+) ≥ this x σ₀ (and Δ(+) > 0); per metric: a,b")
    parser.add_argument("--min-gap", default="3.0", help="pass needs Δ(+) − Δ(−) ≥ this x σ₀; per metric: a,b")
    parser.add_argument(
        "--criterion", choices=("control", "conditioning"), default="control",
        help="control: as-is vs negated advantages (RL stages); conditioning: stage 1's own-vs-shuffled captions",
    )  # fmt: skip
    parser.add_argument("--max-start-z", type=float, default=3.0, help="conditioning: |z| at step 0 must be below")
    parser.add_argument("--min-end-z", type=float, default=4.0, help="conditioning: z at the end must reach")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args(argv)

    import torch

    from uae_fast.train.cli import _quiet

    torch.set_num_threads(1)
    _quiet()
    overrides = [*([f"max_steps={args.steps}"] if args.steps else []), *args.overrides]
    seeds = parse_seeds(args.seeds)
    if args.criterion == "conditioning":
        return conditioning_table(args, seeds, overrides)
    metrics = args.metric.split(",")
    std_metrics = args.std_metric.split(",") if args.std_metric else [f"{m}_std" for m in metrics]
    gains, gaps = _per_metric(args.min_gain, metrics, "--min-gain"), _per_metric(args.min_gap, metrics, "--min-gap")
    if len(std_metrics) != len(metrics):
        parser.error(f"--std-metric needs one key per --metric ({len(metrics)}), got {args.std_metric}")
    header = "".join(f" {m} Δ(+)/σ₀ | {m} (Δ(+)−Δ(−))/σ₀ |" for m in metrics) if len(metrics) > 1 else (
        " Δ(+)/σ₀ | (Δ(+)−Δ(−))/σ₀ |")  # fmt: skip
    lines = [f"| seed |{header} pass |", "|---|" + "---|" * (2 * len(metrics) + 1)]
    passed = 0
    for seed in seeds:
        started = time.perf_counter()
        plus = run(args.config, seed, False, overrides)
        minus = run(args.config, seed, True, overrides)
        cells, ok = [], True
        for metric, std_metric, min_gain, min_gap in zip(metrics, std_metrics, gains, gaps):
            sigma0 = first(plus, std_metric)
            gain = delta(plus, metric, args.window) / sigma0
            gap = gain - delta(minus, metric, args.window) / sigma0
            ok = ok and gain > 0 and gain >= min_gain and gap >= min_gap
            cells += [f"{gain:.2f}", f"{gap:.2f}"]
        passed += ok
        lines.append(f"| {seed} | {' | '.join(cells)} | {'✓' if ok else '✗'} |")
        seconds = time.perf_counter() - started
        print(f"seed {seed}: Δ(+), gap in σ₀: {' / '.join(cells)} ({seconds:.0f} s)", file=sys.stderr)
    print("\n".join(lines))
    print(f"\n{passed} of {len(seeds)}")
    return 0


def _per_metric(text: str, metrics: list[str], flag: str) -> list[float]:
    """One threshold for every metric, or one per metric (`1.5,0`)."""
    values = [float(v) for v in str(text).split(",")]
    if len(values) == 1:
        return values * len(metrics)
    if len(values) != len(metrics):
        raise SystemExit(f"{flag} needs one value or one per --metric ({len(metrics)}), got {text}")
    return values


def conditioning_table(args, seeds: list[int], overrides: list[str]) -> int:
    """Stage 1: z of the own-vs-shuffled caption gain at step 0 and at the end, one run per seed."""
    lines = ["| seed | z at step 0 | z at the end | loss (own captions) start → end | pass |", "|---|---|---|---|---|"]
    passed = 0
    for seed in seeds:
        started = time.perf_counter()
        rows = [row for row in run(args.config, seed, False, overrides) if "eval/caption_gain_z" in row]
        z0, z1 = rows[0]["eval/caption_gain_z"], rows[-1]["eval/caption_gain_z"]
        ok = abs(z0) < args.max_start_z and z1 >= args.min_end_z
        passed += ok
        own = f"{rows[0]['eval/loss_own']:.3f} → {rows[-1]['eval/loss_own']:.3f}"
        lines.append(f"| {seed} | {z0:.2f} | {z1:.2f} | {own} | {'✓' if ok else '✗'} |")
        seconds = time.perf_counter() - started
        print(f"seed {seed}: z {z0:.2f} → {z1:.2f} ({seconds:.0f} s)", file=sys.stderr)
    print("\n".join(lines))
    print(f"\n{passed} of {len(seeds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
