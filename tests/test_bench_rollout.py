"""`benchmarks/bench_rollout.py --quick` at the tiny preset's size: every row runs and the table's values are sane."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def bench(benchmark_module):
    with benchmark_module("bench_rollout") as module:
        yield module


@pytest.mark.slow
def test_quick_rollout_benchmark_table_is_sane(bench, capsys):
    rows = bench.main(["--quick", "--shapes", "tiny", "--repeats", "1", "--warmup", "0"])
    table = capsys.readouterr().out
    assert "| shape | variant | tokens | time (s) | tokens/s | peak +MB | ours vs this (tokens/s) |" in table
    names = [r["variant"] for r in rows]
    assert names[:2] == ["generate, prompt x G (TRL)", "generate, num_return_sequences=G"] and names[-1] == "ours"
    # the row of the DynamicCache loop needs git and the repository's history
    assert len(rows) == 3 or names[2] == f"before ({bench.BEFORE})"
    most = 2 * 4 * 8  # --quick: B=2 images x G=4 captions x 8 new tokens
    for row in rows:
        assert row["shape"] == "tiny"
        tokens, seconds, rate = float(row["tokens"]), float(row["time (s)"]), float(row["tokens/s"])
        assert 2 * 4 <= tokens <= most  # at least one token per caption
        assert seconds > 0 and rate > 0
        assert rate == pytest.approx(tokens / seconds, rel=0.05)  # one timed round: the same numbers
        assert float(row["peak +MB"]) > -50  # what the call added to resident memory (small, >= 0 up to noise)
        assert float(row["ours vs this (tokens/s)"].rstrip("x")) > 0
    assert rows[-1]["ours vs this (tokens/s)"] == "1.00x"
