"""Shared benchmark helpers: interleaved median timing, peak-RSS measurement in a fresh process, markdown tables.

Timings on shared 2-core machines swing by 2x under load from other processes, so variants are run round-robin
(interleaved) and the median is reported. Peak memory is measured per variant in a fresh child process: the kernel's
peak-RSS counter is reset after the inputs exist, so the figure is what the variant itself adds.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

__all__ = [
    "interleaved_medians",
    "summarise_child_runs",
    "reset_peak_rss",
    "peak_rss_mb",
    "current_rss_mb",
    "measure_peak_in_child",
    "child_report",
    "markdown_table",
    "fmt_ratio",
]

_CHILD_MARK = "BENCH_CHILD_RESULT "


def interleaved_medians(
    variants: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Run every variant `warmup` times, then `repeats` rounds of one call each, round-robin; median seconds."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS (VmHWM) counter of this process to the current RSS (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb() -> float:
    return _status_kb("VmHWM") / 1024


def current_rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def child_report(result: dict) -> None:
    """Called in the child: print the result where `measure_peak_in_child` finds it."""
    print(_CHILD_MARK + json.dumps(result), flush=True)


def measure_peak_in_child(script: str, args: Sequence[str], env: dict | None = None) -> dict:
    """Run `python script *args` (which must call `child_report`) and return its JSON result."""
    out = subprocess.run(
        [sys.executable, script, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )
    for line in out.stdout.splitlines():
        if line.startswith(_CHILD_MARK):
            return json.loads(line[len(_CHILD_MARK) :])
    raise RuntimeError(f"child {script} {' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


def summarise_child_runs(results: list[dict]) -> dict:
    """Medians over child runs that each reported `steps` (a list of per-step timing dicts), `peak_mb` and
    `baseline_mb`: every timing key, plus `peak_add` (peak − baseline), `peak_total`, `baseline` and `n_steps`."""
    steps = [s for r in results for s in r["steps"]]
    med = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
    return {
        **med,
        "peak_add": statistics.median(r["peak_mb"] - r["baseline_mb"] for r in results),
        "peak_total": statistics.median(r["peak_mb"] for r in results),
        "baseline": statistics.median(r["baseline_mb"] for r in results),
        "n_steps": len(steps),
    }


def fmt_ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs else "n/a"


def markdown_table(rows: list[dict], columns: Sequence[str]) -> str:
    """Rows of dicts → a GitHub markdown table with the given column order."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)
