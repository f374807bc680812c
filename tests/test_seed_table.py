"""scripts/seed_table.py judges each metric of a pair of runs by its own thresholds (the unified schedule's two
stages): checked on synthetic runs against Δ and σ₀ worked out here."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def table(script_module):
    return script_module("seed_table")


def unified_rows(g4u: list[float], u4g: list[float], g4u_std: float, u4g_std: float) -> list[dict]:
    """A unified run's metrics: stage 2a's steps log `g4u/...`, then stage 2b's log `u4g/...`."""
    rows = [{"g4u/reward": r, "g4u/reward_std": g4u_std} for r in g4u]
    return rows + [{"u4g/reward": r, "u4g/reward_std": u4g_std} for r in u4g]


def test_each_stage_is_measured_over_its_own_steps_with_its_own_thresholds(table, monkeypatch, capsys):
    ramp = [0.1 * i for i in range(10)]  # last 5 minus first 5 = 0.5
    runs = {
        (1, False): unified_rows(ramp, ramp, g4u_std=0.1, u4g_std=0.05),  # 2a: 5σ₀; 2b: 10σ₀
        (1, True): unified_rows([0.0] * 10, [0.0] * 10, 0.1, 0.05),
        (2, False): unified_rows(ramp, [0.0] * 10, 0.1, 0.05),  # 2b does not rise
        (2, True): unified_rows([0.0] * 10, [0.0] * 10, 0.1, 0.05),
    }
    monkeypatch.setattr(table, "run", lambda config, seed, negate, overrides: runs[(seed, negate)])
    args = ["--config", "unified_tiny", "--seeds", "1,2", "--metric", "g4u/reward,u4g/reward",
            "--min-gain", "1.5,0", "--min-gap", "3,5"]  # fmt: skip
    assert table.main(args) == 0
    out = capsys.readouterr().out
    assert "| 1 | 5.00 | 5.00 | 10.00 | 10.00 | ✓ |" in out
    assert "| 2 | 5.00 | 5.00 | 0.00 | 0.00 | ✗ |" in out  # 2a passes, 2b's Δ(+) is not > 0
    assert "1 of 2" in out


def test_thresholds_are_one_value_or_one_per_metric(table):
    assert table._per_metric("2", ["a", "b"], "--min-gap") == [2.0, 2.0]
    assert table._per_metric("1.5,0", ["a", "b"], "--min-gain") == [1.5, 0.0]
    with pytest.raises(SystemExit, match="--min-gap needs one value or one per --metric"):
        table._per_metric("1,2,3", ["a", "b"], "--min-gap")
