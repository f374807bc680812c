"""Smoke tests of the benchmarks' new rows: the bare-GEMM search of bench_grpo_loss (every candidate computes the same
GEMMs; the fastest is used and named), the peer columns of bench_packing and bench_reward, and bench_stage2a's TRL
rows (checkpointing on and off), ratio rules and shapes. Small sizes; never asserts on wall time."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


@pytest.fixture(scope="module")
def grpo(benchmark_module):
    with benchmark_module("bench_grpo_loss") as module:
        return module


def test_bare_gemms_every_candidate_computes_the_same_gradients(grpo):
    x = grpo.make_inputs(16, 8)
    h = x.hidden.reshape(-1, 8)
    z = h @ x.weight.t()  # [N, V] logits, standing in for p
    want_w, want_h = z.t() @ h, (z @ x.weight)[-4:]
    for layout in grpo.BARE_SEARCH["layout"]:
        for chunk, block in [(None, None), (4, None), (4, 2048), (16, 8192), (3, 1000)]:
            grad_h, grad_w = grpo.run_bare(x, True, chunk, block, layout)
            torch.testing.assert_close(grad_w, want_w, rtol=1e-4, atol=1e-4)
            if chunk == 4:  # the last chunk's d/dh
                torch.testing.assert_close(grad_h, want_h, rtol=1e-4, atol=1e-4)
            assert grpo.run_bare(x, False, chunk, block, layout)[1] is None


def test_bare_search_takes_the_fastest_and_names_it(grpo):
    x = grpo.make_inputs(16, 8)
    timed, best = grpo.search_bare(x, False, repeats=1)
    assert best == timed[0]["settings"] == x.bare[False]
    assert [r["time"] for r in timed] == sorted(r["time"] for r in timed)
    assert len(timed) == len({r["settings"] for r in timed}) >= 4  # chunks >= N collapse to one candidate
    label = grpo.bare_label(best)
    assert label.startswith("bare GEMMs (chunk ") and best[2] in label


def test_packing_table_times_both_sides_and_names_the_peer(capsys, benchmark_module):
    with benchmark_module("bench_packing") as bench:
        bench.main(["--repeats", "1"])
    out = capsys.readouterr().out
    assert "pure-Python FFD" in out and "| peer |" in out and "median of 1 (both sides)" in out


@pytest.mark.slow
def test_reward_table_names_the_peer(capsys, benchmark_module):
    with benchmark_module("bench_reward") as bench:
        bench.main(["--quick", "--kinds", "tiny", "--generations", "2", "--batch", "2"])
    out = capsys.readouterr().out
    assert "what it does" in out and "per-pair: each (source, reconstruction) pair" in out
    assert "1 warm-up call" in out


@pytest.fixture(scope="module")
def s2a(benchmark_module):
    with benchmark_module("bench_stage2a") as module:
        return module


def _summary(step, peak):
    return {"step": step, "peak_add": peak, "peak_total": peak + 1000.0}


def test_stage2a_ratios_use_trl_fastest_speed_and_lowest_peak(s2a):
    summary = {"trl": _summary(10.0, 100.0), "trl-nockpt": _summary(6.0, 300.0), "ours": _summary(2.0, 40.0)}
    fastest, lowest = s2a.compare(summary)
    assert fastest is summary["trl-nockpt"] and lowest is summary["trl"]
    line = s2a.targets_line(summary)
    assert "3.00x TRL's fastest (>= 3x: met)" in line and "0.40x TRL's lowest (<= 0.5x: met)" in line
    summary["ours"] = _summary(3.0, 60.0)
    assert "MISSED" in s2a.targets_line(summary)
    row = s2a._row("ours", {**summary["ours"], "cpu": 1, "generation": 1, "reconstruct": 0, "score": 0, "update": 1,
                            "other": 0, "baseline": 1}, fastest, lowest)  # fmt: skip
    assert row["samples/s vs TRL fastest"] == "2.00x" and row["peak + vs TRL lowest"] == "0.60x"


def test_stage2a_trl_rows_set_gradient_checkpointing(s2a, tmp_path):
    pytest.importorskip("trl")
    args = SimpleNamespace(trl_micro_batch=8, device="cpu", max_tokens=4, warmup=0, steps=1, seed=0, suppress_tokens=[])
    assert s2a._trl_config(args, str(tmp_path), checkpointing=True).gradient_checkpointing is True
    off = s2a._trl_config(args, str(tmp_path), checkpointing=False)
    assert off.gradient_checkpointing is False and off.use_cpu and not off.bf16
    assert {"trl", "trl-nockpt", "ours"} <= set(s2a.RUNNERS) and set(s2a.PEERS) == {"trl", "trl-nockpt"}


def test_stage2a_setup_qwen3b_widths(benchmark_module):
    with benchmark_module("stage2a_setup") as setup:
        widths = setup.SHAPES["qwen3b"]
    assert widths == {
        "hidden_size": 2048,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "intermediate_size": 11008,
    }
    with pytest.raises(ValueError, match="shape must be one of"):
        setup.prepare("/nonexistent", shape="qwen7b")
