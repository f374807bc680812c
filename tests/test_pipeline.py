"""The whole path a new user runs, from the command line on the demo images: `data build` → `data check` →
`train --stage pretrain` on the shards (interrupted and resumed, ending where an uninterrupted run ends) →
`train --stage g4u` from stage 1's final model."""

from __future__ import annotations

import json

import pytest
import torch

import uae_fast
import uae_fast.api
from uae_fast.cli import main

COMMON = ["report_images=0", "tensorboard=false", "pretrain.batch_size=2"]


def _stage1(tmp_path, name: str, *extra: str) -> int:
    shards = tmp_path / "shards"
    argv = ["train", "--preset", "tiny", "--stage", "pretrain", "--out", str(tmp_path / name), f"data.shards={shards}"]
    return main([*argv, *COMMON, *extra])


def test_data_build_check_stage1_then_stage2a(tmp_path, tiny, capsys):
    torch.set_num_threads(1)
    build = ["data", "build", "--demo", "--preset", "tiny", "--out", str(tmp_path / "shards"), "--shard-size", "2",
             "--min-words", "1", "--max-repetition", "1", "--max-new-tokens", "8"]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:  # `data build` captions with the session's tiny UAE (no load);
        real = uae_fast.api.load  # training loads (and changes) models of its own
        patch.setattr(uae_fast.api, "load", lambda name, **kw: tiny if name == "tiny" else real(name, **kw))
        assert main(build) == 0
    assert main(["data", "check", str(tmp_path / "shards")]) == 0
    assert "4 ok, 0 problem(s)" in capsys.readouterr().out

    # stage 1: 3 steps straight, and 2 steps then resumed to 3 — the same weights
    assert _stage1(tmp_path, "straight", "max_steps=3") in (0, None)
    assert _stage1(tmp_path, "resumed", "max_steps=2", "save_steps=1") in (0, None)
    assert _stage1(tmp_path, "resumed", "max_steps=3", "save_steps=1", "--resume") in (0, None)
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    straight = uae_fast.load(tmp_path / "straight" / "final")
    resumed = uae_fast.load(tmp_path / "resumed" / "final")
    for (name, a), (_, b) in zip(straight.decoder.transformer.named_parameters(),
                                 resumed.decoder.transformer.named_parameters()):  # fmt: skip
        assert torch.allclose(b, a, rtol=1e-5, atol=1e-6), (name, float((a - b).abs().max()), float(a.abs().max()))
    for a, b in zip(straight.encoder.projector.parameters(), resumed.encoder.projector.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)

    # stage 2a trains the captioner of stage 1's result
    run2 = tmp_path / "g4u"
    argv = ["train", "--preset", "tiny", "--out", str(run2), f"model={tmp_path / 'resumed' / 'final'}", "max_steps=1",
            "batch_size=8", "max_completion_length=4", "report_images=0", "tensorboard=false"]  # fmt: skip
    assert main(argv) in (0, None)
    final = uae_fast.load(run2 / "final")
    for a, b in zip(resumed.encoder.projector.parameters(), final.encoder.projector.parameters()):
        torch.testing.assert_close(b, a)  # stage 2a keeps stage 1's projector
    assert (run2 / "final" / "llm_lora").is_dir()
