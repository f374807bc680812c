"""benchmarks/bench_scale.py: metrics.jsonl rows -> a table row (no runs launched)."""

from __future__ import annotations

import json

import pytest


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_metrics_become_a_table_row(tmp_path, benchmark_module):
    steps = [
        {"step": 1, "samples_per_s": 5.0, "time/step": 3.2, "memory/peak_gb": 0.9},  # warm-up
        {"step": 2, "samples_per_s": 8.0, "time/step": 2.0, "memory/peak_gb": 1.0},  # warm-up
        {"step": 3, "samples_per_s": 16.0, "time/step": 1.0, "memory/peak_gb": 1.25},
        {"step": 4, "samples_per_s": 20.0, "time/step": 0.8, "memory/peak_gb": 1.5},
        {"step": 5, "samples_per_s": 24.0, "time/step": 0.6, "memory/peak_gb": 1.5},
    ]
    _write(tmp_path / "metrics.jsonl", steps)
    with benchmark_module("bench_scale") as bench:
        s = bench.summarise_metrics(tmp_path / "metrics.jsonl", warmup=2)
        assert s["n_steps"] == 3
        assert s["samples_per_s"] == pytest.approx((16 + 20 + 24) / 3)
        assert s["step_s"] == pytest.approx((1.0 + 0.8 + 0.6) / 3)
        assert s["peak_gb"] == pytest.approx(1.5)

        baseline = {"samples_per_s": 12.0, "step_s": 1.3, "peak_gb": 1.2, "n_steps": 3}
        row = bench.table_row("g4u", 2, "ddp", s, baseline)
        assert list(row) == bench.COLUMNS
        assert row["samples/s (global)"] == "20.00"
        assert row["step time (s)"] == "0.800"
        assert row["peak memory per rank (GiB)"] == "1.50"
        assert row["speed-up vs 1 process"] == f"{20 / 12:.2f}x"  # 1.67x
        assert row["memory per rank vs 1 process"] == f"{1.5 / 1.2:.2f}x"  # 1.25x
        assert bench.table_row("g4u", 1, "none", baseline, None)["speed-up vs 1 process"] == ""

        _write(tmp_path / "short.jsonl", steps[:2])
        with pytest.raises(ValueError, match="no step after"):
            bench.summarise_metrics(tmp_path / "short.jsonl", warmup=2)


def test_commands_are_the_cli_users_run(tmp_path, benchmark_module):
    with benchmark_module("bench_scale") as bench:
        one = bench.command("pretrain", str(tmp_path), 8, 1, None)
        two = bench.command("g4u", str(tmp_path), 8, 2, "zero2")
    assert one[1:5] == ["-m", "uae_fast.cli", "train", "--preset"] and "pretrain.batch_size=8" in one
    assert not any(a.startswith("distributed.engine") for a in one)
    assert two[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node=2"]
    assert "distributed.engine=zero2" in two and "batch_size=16" in two and "max_steps=8" in two
