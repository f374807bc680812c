"""Sequence packing: padding of naive pad-to-longest batches vs our first-fit-decreasing packing, and packing speed.

4,096 sequences with a caption-like length spread (log-normal, clipped to 40-600 tokens). The naive baseline
takes sequences in their original order, `batch` at a time, and pads each batch to its longest sequence (what a
plain DataLoader + collate does). Ours packs under a token budget; its "padding" is the capacity a micro-batch
leaves unused if padded to the budget (with varlen attention nothing is padded at all). Packing time includes
building cu_seqlens, position ids and the gather indices (everything the training step needs).

Usage: python benchmarks/bench_packing.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from utils import markdown_table  # noqa: E402

from uae_fast.rl import pack_sequences  # noqa: E402


def caption_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=np.log(220), sigma=0.55, size=n), 40, 600).astype(np.int64)


def naive_padding(lengths: np.ndarray, batch: int) -> float:
    padded = sum(int(lengths[i : i + batch].max()) * len(lengths[i : i + batch]) for i in range(0, len(lengths), batch))
    return 1.0 - lengths.sum() / padded


def python_ffd_seconds(lengths: np.ndarray, budget: int) -> float:
    """A straightforward pure-Python FFD (the peer a trainer would write inline), for the speed ratio."""
    start = time.perf_counter()
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free: list[int] = []
    bins: list[list[int]] = []
    for i in order:
        for b, f in enumerate(free):
            if f >= lengths[i]:
                free[b] -= int(lengths[i])
                bins[b].append(i)
                break
        else:
            free.append(budget - int(lengths[i]))
            bins.append([i])
    for seqs in bins:  # the varlen metadata
        lens = lengths[seqs]
        np.concatenate([[0], np.cumsum(lens)])
        np.concatenate([np.arange(n) for n in lens])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timing repeats (same rows)")
    args = parser.parse_args()
    repeats = 3 if args.quick else 15
    lengths = caption_lengths(4096)
    tokens = int(lengths.sum())
    spread = f"lengths {lengths.min()}-{lengths.max()} (median {np.median(lengths):.0f})"
    print(f"4096 sequences, {tokens:,} tokens, {spread}\n")
    rows = []
    for budget in (4096, 8192, 16384):
        batch = max(1, budget // 600)  # naive batch size that always fits the budget
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            packed = pack_sequences(lengths, budget)
            times.append(time.perf_counter() - start)
        t = float(np.median(times))
        t_py = python_ffd_seconds(lengths, budget)
        rows.append(
            {
                "token budget": budget,
                "naive batch (seqs)": batch,
                "naive pad-to-longest padding": f"{naive_padding(lengths, batch):.1%}",
                "ours: micro-batches": len(packed.batches),
                "ours: padding (unused budget)": f"{packed.padding_fraction():.2%}",
                "ours: pack time": f"{t * 1e3:.2f} ms",
                "ours: M tokens/s": f"{tokens / t / 1e6:.0f}",
                "pure-Python FFD": f"{t_py * 1e3:.0f} ms",
                "speed vs Python": f"{t_py / t:.0f}x",
            }
        )
    print(markdown_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
