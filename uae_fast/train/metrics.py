"""Step metrics: a progress bar in a terminal, one plain line per logging step in job logs, `metrics.jsonl` in the
run folder and TensorBoard event files.

Names follow TRL (`reward`, `reward_std`, `frac_reward_zero_std`, `kl`, `clip_ratio/...`, `entropy`,
`completions/mean_length`), plus per-phase throughput (`rollout/tokens_per_s`, `reconstruct/images_per_s`, ...).
On resume, lines of `metrics.jsonl` past the resumed step are dropped (and a line torn by a crash mid-write is
dropped too), the file is rewritten atomically, and TensorBoard purges the same steps, so a resumed run's log
reads as one uninterrupted run with each step once.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..io import write_text_atomic

__all__ = ["MetricsLogger", "read_metrics"]

# Shown in the progress bar / the job-log line; everything goes to the files.
_SHORT_KEYS = {"reward": "reward", "kl": "kl", "completions/mean_length": "len", "samples_per_s": "samples/s"}


def read_metrics(path: Path) -> list[dict]:
    """Rows of a `metrics.jsonl`, skipping lines that do not parse (a line torn by a crash mid-write)."""
    rows = []
    if not Path(path).exists():
        return rows
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


class MetricsLogger:
    """Writes each logging step once; `stream` (default stderr) gets a bar in a terminal, plain lines otherwise."""

    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int = 0, tensorboard: bool = True, stream=None):
        from tqdm import tqdm

        self.path = Path(run_dir) / "metrics.jsonl"
        self.total, self.start_step = total_steps, start_step
        self.stream = stream or sys.stderr
        self._truncate_after(start_step)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency, but a stripped environment should still train
                print("uae-fast: tensorboard is not installed; metrics go to metrics.jsonl only", file=self.stream)
            else:
                self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        # tqdm disables itself off a terminal (disable=None); job logs then get one plain line per logging step.
        self.bar = tqdm(
            total=total_steps, initial=start_step, desc="train", unit="step", disable=None, file=self.stream
        )
        self._started = time.perf_counter()

    def _truncate_after(self, step: int) -> None:
        if self.path.exists():
            kept = [row for row in read_metrics(self.path) if row["step"] <= step]
            write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)
        shown = {short: f"{metrics[k]:.4g}" for k, short in _SHORT_KEYS.items() if k in metrics}
        if self.bar.disable:
            self.stream.write(self.job_log_line(step, shown) + "\n")
            self.stream.flush()
        else:
            self.bar.set_postfix(shown)

    def job_log_line(self, step: int, shown: dict[str, str]) -> str:
        """`step 3/40 | reward 0.412 | kl 0 | len 7.5 | samples/s 9.1 | eta 0:01:02` (ETA from this session's pace)."""
        done = step - self.start_step
        elapsed = time.perf_counter() - self._started
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        parts = [f"step {step}/{self.total}", *(f"{k} {v}" for k, v in shown.items()), f"eta {_clock(eta)}"]
        return " | ".join(parts)

    def advance(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _clock(seconds: float) -> str:
    if seconds != seconds:  # NaN: nothing measured yet
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _plain(value):
    return value.item() if hasattr(value, "item") else value
