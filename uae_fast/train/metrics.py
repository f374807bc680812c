"""Step metrics: a console progress bar, `metrics.jsonl` in the run folder and TensorBoard event files.

Names follow TRL (`reward`, `reward_std`, `frac_reward_zero_std`, `kl`, `clip_ratio/...`, `entropy`,
`completions/mean_length`), plus per-phase throughput (`rollout/tokens_per_s`, `reconstruct/images_per_s`, ...).
On resume, lines of `metrics.jsonl` past the resumed step are dropped and TensorBoard purges them too, so a
resumed run's log reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["MetricsLogger"]

# Shown in the progress bar; everything goes to the files.
_BAR_KEYS = {"reward": "reward", "kl": "kl", "completions/mean_length": "len", "time/step": "s/step"}


class MetricsLogger:
    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int = 0, tensorboard: bool = True):
        from tqdm import tqdm

        self.path = Path(run_dir) / "metrics.jsonl"
        self._truncate_after(start_step)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency, but a stripped environment should still train
                print("uae-fast: tensorboard is not installed; metrics go to metrics.jsonl only", file=sys.stderr)
            else:
                self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=None, file=sys.stderr)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)
        self.bar.set_postfix({short: f"{metrics[k]:.4g}" for k, short in _BAR_KEYS.items() if k in metrics})

    def advance(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _plain(value):
    return value.item() if hasattr(value, "item") else value
