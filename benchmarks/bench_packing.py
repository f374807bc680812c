"""Sequence packing: padding of naive pad-to-longest batches vs our first-fit-decreasing packing, and packing speed.

4,096 sequences with a caption-like length spread (log-normal, clipped to 40-600 tokens). The naive baseline
takes sequences in their original order, `batch` at a time, and pads each batch to its longest sequence (what a
plain DataLoader + collate does). Ours packs under a token budget; its "padding" is the capacity a micro-batch
leaves unused if padded to the budget (with varlen attention nothing is padded at all). Packing time includes
building cu_seqlens, position ids and the gather indices (everything the training step needs).

Speed peer: the same first-fit-decreasing packing written inline in Python, as a trainer would (sort by length, put
each sequence in the first micro-batch with room, then NumPy cu_seqlens and position ids per micro-batch). Both
sides are timed the same way: one warm-up call each, then --repeats rounds of one call each, interleaved, median.

Usage: python benchmarks/bench_packing.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from utils import interleaved_medians, markdown_table  # noqa: E402

from uae_fast.rl import pack_sequences  # noqa: E402


def caption_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=np.log(220), sigma=0.55, size=n), 40, 600).astype(np.int64)


def naive_padding(lengths: np.ndarray, batch: int) -> float:
    padded = sum(int(lengths[i : i + batch].max()) * len(lengths[i : i + batch]) for i in range(0, len(lengths), batch))
    return 1.0 - lengths.sum() / padded


PEER = "pure-Python FFD (sorted; first bin with room; NumPy cu_seqlens + position ids)"


def python_ffd(lengths: np.ndarray, budget: int) -> list[list[int]]:
    """A straightforward pure-Python FFD (the peer a trainer would write inline), for the speed ratio."""
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
    return bins


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timing repeats (same rows)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per side (default 15, quick 3)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 15)
    lengths = caption_lengths(4096)
    tokens = int(lengths.sum())
    spread = f"lengths {lengths.min()}-{lengths.max()} (median {np.median(lengths):.0f})"
    print(f"4096 sequences, {tokens:,} tokens, {spread}\n")
    rows = []
    for budget in (4096, 8192, 16384):
        batch = max(1, budget // 600)  # naive batch size that always fits the budget
        packed = pack_sequences(lengths, budget)
        assert len(packed.batches) == len(python_ffd(lengths, budget))  # same algorithm, same micro-batch count
        times = interleaved_medians(
            {"ours": lambda: pack_sequences(lengths, budget), "peer": lambda: python_ffd(lengths, budget)},
            repeats=repeats,
            warmup=1,
        )
        t, t_py = times["ours"], times["peer"]
        rows.append(
            {
                "token budget": budget,
                "naive batch (seqs)": batch,
                "naive pad-to-longest padding": f"{naive_padding(lengths, batch):.1%}",
                "ours: micro-batches": len(packed.batches),
                "ours: padding (unused budget)": f"{packed.padding_fraction():.2%}",
                "ours: pack time": f"{t * 1e3:.2f} ms",
                "ours: M tokens/s": f"{tokens / t / 1e6:.0f}",
                "peer": PEER,
                "peer: pack time": f"{t_py * 1e3:.1f} ms",
                "speed vs peer": f"{t_py / t:.0f}x",
            }
        )
    print(markdown_table(rows, list(rows[0])))
    print(f"\nCPU, 1 process; pack times: warm, interleaved, median of {repeats} (both sides)")


if __name__ == "__main__":
    main()
