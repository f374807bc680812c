"""Fixtures of the training tests."""

from __future__ import annotations

import statistics

import pytest
import torch


@pytest.fixture
def control_pair():
    """Train a shipped config twice with the same seed — as is and with the advantages negated — on one thread, and
    return (Δ(+)/σ₀, Δ(−)/σ₀): σ₀ = within-group reward std at step 1, Δ = mean reward of the last 5 steps − the
    first 5 (the learning criterion's quantities; each test asserts its own thresholds). With `stages` (the unified
    schedule: `("g4u", "u4g")`), {stage: (Δ(+)/σ₀, Δ(−)/σ₀)}, each over the steps that stage trained."""
    from uae_fast.train import G4UTrainer, U4GTrainer, UnifiedTrainer, load_train_config

    trainers = {"g4u": G4UTrainer, "u4g": U4GTrainer, "unified": UnifiedTrainer}
    threads = torch.get_num_threads()
    # The tiny models gain nothing from a second thread, and on shared cores two threads can run 10x slower.
    torch.set_num_threads(1)

    def train(config_name: str, run_dir, seed: int, negate: bool, overrides: list[str]) -> list[dict]:
        settings = [f"output_dir={run_dir}", f"seed={seed}", f"negate_advantages={str(negate).lower()}", *overrides]
        config = load_train_config(config_name, settings)
        trainer = trainers[config.stage](config)
        return [trainer.train_step() for _ in range(config.max_steps)]

    def run(config_name: str, tmp_path, seed: int, overrides: list[str] = (), stages: tuple[str, ...] = ()):
        plus = train(config_name, tmp_path / "plus", seed, False, list(overrides))
        minus = train(config_name, tmp_path / "minus", seed, True, list(overrides))

        def measured(prefix: str) -> tuple[float, float]:
            def rewards(metrics):
                return [m[f"{prefix}reward"] for m in metrics if f"{prefix}reward" in m]

            sigma0 = next(m[f"{prefix}reward_std"] for m in plus if f"{prefix}reward_std" in m)
            assert sigma0 > 0

            def delta(r):
                return statistics.mean(r[-5:]) - statistics.mean(r[:5])

            return delta(rewards(plus)) / sigma0, delta(rewards(minus)) / sigma0

        return {stage: measured(f"{stage}/") for stage in stages} if stages else measured("")

    yield run
    torch.set_num_threads(threads)


class _Killed(Exception):
    pass


@pytest.fixture
def kill_at_step():
    """`kill_at_step(trainer, k)`: run `trainer.train()` and die (as a killed job would) before step k + 1, after
    the checkpoints of steps <= k were written."""

    def run(trainer, k: int) -> None:
        step = trainer.train_step

        def dying_step():
            if trainer.step == k:
                raise _Killed
            return step()

        trainer.train_step = dying_step
        with pytest.raises(_Killed):
            trainer.train()

    return run
