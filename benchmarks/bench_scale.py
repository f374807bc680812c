"""Scale-out on one machine: `uae-fast train` (tiny preset) in 1 process vs 2 processes under each engine
(`distributed.engine=ddp | fsdp2 | zero2 | zero3`, torchrun, gloo on CPU), the same GLOBAL batch and steps.

Each row runs the product CLI exactly as a user does (`python -m uae_fast.cli train ...`, or under
`python -m torch.distributed.run --nproc_per_node=2 ...`) in a subprocess and reads the run's metrics.jsonl (one line
per step, merged over ranks): samples/s is the global throughput (summed over ranks), step time the mean over ranks,
peak memory the largest rank's peak resident memory. The first `--warmup` steps (default 2) are left out; the table
shows the mean of samples/s and step time over the other steps and the largest peak memory. Every process runs with
OMP_NUM_THREADS=1; for one process a second row with OMP_NUM_THREADS=2 uses both cores through threads, so "2 cores as
1 process x 2 threads" stands next to "2 processes x 1 thread".

Stages: `g4u` (stage 2a: batch_size=16 completions = 4 images x num_generations=4, decoder.batch_size=4) and
`pretrain` (stage 1: pretrain.batch_size=8 pairs, pretrain.eval_images=0).

    python benchmarks/bench_scale.py                                   # both stages, 4 engines: ~4 min on 2 cores
    python benchmarks/bench_scale.py --stages pretrain --engines ddp --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utils import fmt_ratio, markdown_table  # noqa: E402

__all__ = ["STAGES", "ENGINES", "COLUMNS", "command", "summarise_metrics", "table_row", "main"]

COMMON = ["report_images=0", "save_final_model=false", "tensorboard=false", "save_steps=1000000"]
STAGES = {
    "g4u": ["batch_size=16", "num_generations=4", "decoder.batch_size=4"],
    "pretrain": ["--stage", "pretrain", "pretrain.batch_size=8", "pretrain.eval_images=0"],
}
ENGINES = ("ddp", "fsdp2", "zero2", "zero3")
COLUMNS = ["stage", "processes", "engine", "samples/s (global)", "step time (s)", "peak memory per rank (GiB)",
           "speed-up vs 1 process", "memory per rank vs 1 process"]  # fmt: skip
PARAGRAPH = """\
What this predicts for GPUs, and what it does not. These CPU rows check the engines' mechanics and overheads (the
global batch split over the ranks, gradients averaged with gloo over shared memory, torchrun's launch), not GPU
scaling: on GPUs NCCL all-reduces over NVLink/InfiniBand overlap with the backward pass and every rank has its own
accelerator, whereas here the processes share 2 cores with each other (and with anything else running). The tiny
model's step is dominated by per-step overhead (Python, op dispatch, small GEMMs, a collective's latency), not by
arithmetic, so its speed-ups say little about the real models, whose steps are large GEMMs and whose all-reduce
volume is the trained weights' size. Memory: the per-rank peak here is mostly the interpreter, torch and the
replicated frozen models (encoder, decoder, VAE, reward backbones); ZeRO-2 shards only the trained parameters'
gradients and optimizer state, FSDP2 also the weights of the transformer blocks that hold trained parameters,
ZeRO-3 every weight of the trained models. For the
tiny model those are a few MB, so sharding cannot show a saving here; with the real models (Qwen2.5-VL-3B + LoRA,
SD3.5 DiT) they are GBs per GPU: scripts/memory_plan.py estimates them."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(stage: str, out: str, steps: int, processes: int, engine: str | None) -> list[str]:
    """The exact command line of one row (torchrun when processes > 1)."""
    cli = ["-m", "uae_fast.cli", "train", "--preset", "tiny", "--out", out, *STAGES[stage], f"max_steps={steps}"]
    cli += COMMON + ([f"distributed.engine={engine}"] if engine else [])
    if processes == 1:
        return [sys.executable, *cli]
    run = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={free_port()}"]
    return [sys.executable, *run, *cli]


def summarise_metrics(path: str | Path, warmup: int) -> dict:
    """metrics.jsonl -> means of samples_per_s and time/step over the steps after `warmup`, largest memory/peak_gb."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    timed = [r for r in rows if "samples_per_s" in r and r["step"] > warmup]
    if not timed:
        raise ValueError(f"{path}: no step after the {warmup} warm-up steps")
    n = len(timed)
    return {
        "samples_per_s": sum(r["samples_per_s"] for r in timed) / n,
        "step_s": sum(r["time/step"] for r in timed) / n,
        "peak_gb": max(r["memory/peak_gb"] for r in rows if "memory/peak_gb" in r),
        "n_steps": n,
    }


def table_row(stage: str, processes: int, engine: str, summary: dict, baseline: dict | None) -> dict:
    """One table row; ratios against `baseline` (the 1-process, 1-thread row of the stage), blank without one."""
    return {
        "stage": stage,
        "processes": processes,
        "engine": engine,
        "samples/s (global)": f"{summary['samples_per_s']:.2f}",
        "step time (s)": f"{summary['step_s']:.3f}",
        "peak memory per rank (GiB)": f"{summary['peak_gb']:.2f}",
        "speed-up vs 1 process": fmt_ratio(summary["samples_per_s"], baseline["samples_per_s"]) if baseline else "",
        "memory per rank vs 1 process": fmt_ratio(summary["peak_gb"], baseline["peak_gb"]) if baseline else "",
    }


def run_one(stage: str, steps: int, warmup: int, processes: int, engine: str | None, threads: int, workdir: str):
    """Run a row; its metrics summary (dict), or the error line of a failed run (str)."""
    out = tempfile.mkdtemp(prefix=f"{stage}_{processes}p_{engine or 'single'}_{threads}t_", dir=workdir)
    cmd = command(stage, out, steps, processes, engine)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    print(f"[bench_scale] OMP_NUM_THREADS={threads} {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        # run from the work folder: from the repo root `-m uae_fast.cli` would import the source tree, not the install
        done = subprocess.run(
            cmd, env=env, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900
        )
    except subprocess.TimeoutExpired:
        return "timed out after 900 s"
    print(f"[bench_scale]   exit {done.returncode} after {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if done.returncode != 0:
        lines = done.stdout.strip().splitlines() or ["no output"]
        return next((line for line in reversed(lines) if "rror" in line), lines[-1]).strip()
    return summarise_metrics(Path(out) / "metrics.jsonl", warmup)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    p.add_argument("--steps", type=int, default=8, help="steps per run (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the means (default 2)")
    p.add_argument("--workdir", help="where the run folders go (default: a temp dir, removed afterwards)")
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench_scale_")
    workdir = args.workdir or tmp.name
    os.makedirs(workdir, exist_ok=True)
    load_before = os.getloadavg()
    rows, failures = [], []
    for stage in args.stages:
        runs = [(1, None, 1), (1, None, 2)] + [(2, e, 1) for e in args.engines]
        baseline = None
        for processes, engine, threads in runs:
            label = (engine or "none (1 process)") + (f", OMP_NUM_THREADS={threads}" if threads != 1 else "")
            result = run_one(stage, args.steps, args.warmup, processes, engine, threads, workdir)
            if isinstance(result, str):
                failures.append(f"{stage} / {processes} processes / {label}: {result}")
                rows.append({"stage": stage, "processes": processes, "engine": label, "samples/s (global)": "FAILED"})
                continue
            if processes == 1 and threads == 1:
                baseline = result
            rows.append(table_row(stage, processes, label, result, baseline))
    load_after = os.getloadavg()
    print(
        f"\nTiny preset, CPU ({os.cpu_count()} cores), OMP_NUM_THREADS=1 in every process unless the engine column "
        f"says otherwise; {args.steps} steps per run, the first {args.warmup} left out (means over the other "
        f"{args.steps - args.warmup}); global batch: g4u 16 completions (4 images x 4), pretrain 8 pairs. "
        f"Load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after.\n"
    )
    print(markdown_table(rows, COLUMNS))
    print("\n" + PARAGRAPH)
    for failure in failures:
        print(f"\nFAILED: {failure}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
