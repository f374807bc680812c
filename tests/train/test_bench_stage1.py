"""The stage-1 benchmark at a tiny size, in this process: its diffusers-style peer computes our trainer's step-1 loss
on the same pixels, σ and noise, our row reuses its cached caption conditioning from the second epoch, and the table
holds sane values (positive rates, phases within the step, a ratio vs the peer)."""

from __future__ import annotations

import math

import pytest
import torch


@pytest.fixture(scope="module")
def bench(benchmark_module):
    with benchmark_module("bench_stage1") as module:
        yield module


@pytest.fixture(scope="module")
def results(bench, tmp_path_factory):
    from stage2b_setup import prepare

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core machine 2 threads make these small steps many times slower
    try:
        paths = prepare(tmp_path_factory.mktemp("bench_stage1"), shape=bench.SHAPES["smoke"])
        run = {"warmup": 2, "steps": 1}  # the first epoch (4 pairs, 2 per step) untimed, then a cached step
        return {
            "peer": [bench.run_peer(paths, **run)],
            "ours": [bench.run_ours(paths, cache=True, **run)],
            "ours-nocache": [bench.run_ours(paths, cache=False, **run)],
        }
    finally:
        torch.set_num_threads(threads)


def test_losses_match_and_the_cache_is_used(bench, results):
    first = {v: r[0]["losses"][0] for v, r in results.items()}
    assert first["ours"] == pytest.approx(first["peer"], rel=bench.LOSS_RTOL)
    assert first["ours-nocache"] == pytest.approx(first["peer"], rel=bench.LOSS_RTOL)
    assert all(math.isfinite(x) and x > 0 for r in results.values() for x in r[0]["losses"])
    assert results["ours"][0]["steps"][-1]["cache_hits"] == 2  # epoch 2: both captions of the step cached
    assert results["ours-nocache"][0]["steps"][-1]["cache_hits"] == 0


def test_table_values_are_sane(bench, results):
    rows, summary = bench.summarise(results)
    assert [r["variant"] for r in rows] == [bench.NAMES[v] for v in ("peer", "ours", "ours-nocache")]
    for variant, row in zip(("peer", "ours", "ours-nocache"), rows):
        s = summary[variant]
        assert float(row["samples/s"]) == pytest.approx(bench.SETTINGS["batch_size"] / s["step"], rel=1e-2)
        phases = [float(row[f"{p} (s)"]) for p in bench.PHASES]
        assert all(t >= 0 for t in phases) and sum(phases) <= s["step"] * 1.05 + 1e-3
        assert s["update"] > 0 and s["encode"] > 0
        assert 0 < s["baseline"] <= s["peak_total"] and s["peak_add"] >= 0
        assert (row["samples/s vs peer"] == "") == (variant == "peer")
        if variant != "peer":
            assert float(row["samples/s vs peer"].rstrip("x")) > 0


def test_unequal_losses_fail(bench, results):
    broken = {v: [dict(r[0], losses=list(r[0]["losses"]))] for v, r in results.items()}
    broken["ours"][0]["losses"][0] *= 1.01
    with pytest.raises(AssertionError, match="step-1 loss of ours"):
        bench.summarise(broken)
