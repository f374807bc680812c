"""Unified-Bench: file matching, the score formula, bad inputs, and the `uae-fast bench` commands end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from uae_fast.cli import main
from uae_fast.errors import ConfigError, ImageLoadError
from uae_fast.eval.bench import Pair, build_results, match_files, score_folders
from uae_fast.rewards import BACKBONE_NAMES, ReconstructionReward, as_image_batch, load_backbones

AUTHOR_KEYS = {"model_types", "similarities_by_model", "statistics_by_model", "summary"}


@pytest.fixture(scope="module")
def reward():
    return ReconstructionReward(load_backbones({n: "tiny" for n in BACKBONE_NAMES}), {n: 1.0 for n in BACKBONE_NAMES})


def test_match_files_exact_then_stem_then_recon_prefix():
    refs = [Path(p) for p in ["r/a.png", "r/b.jpg", "r/c.png", "r/lonely.png"]]
    recons = [Path(p) for p in ["x/a.png", "x/b.png", "x/recon_c.png", "x/orphan.png"]]
    pairs, skipped = match_files(recons, refs)
    assert [(p.name, p.reference) for p in pairs] == [("a.png", "a.png"), ("b.png", "b.jpg"), ("recon_c.png", "c.png")]
    assert {Path(s["file"]).name: s["reason"][:12] for s in skipped} == {
        "orphan.png": "no reference",
        "lonely.png": "reference im",
    }


def test_score_formula_on_hand_made_cosines():
    """Per-backbone = mean cosine x 100, Overall = unweighted mean of the four: the paper's UAE row."""
    paper = {"clip": 0.9050, "dinov2": 0.9435, "dinov3": 0.8198, "longclip": 0.7754}
    spread = [-0.01, 0.0, 0.01]  # three images whose cosines average to the paper's value
    pairs = [
        Pair(f"{i}.png", f"{i}.png", "", "", scores={m: v + spread[i] for m, v in paper.items()}) for i in range(3)
    ]
    res = build_results(list(paper), pairs, [{"file": "x/9.png", "side": "reconstruction", "reason": "unreadable"}])
    assert res["unified_bench"] == {"clip": 90.5, "dinov2": 94.35, "dinov3": 81.98, "longclip": 77.54, "overall": 86.09}
    assert res["summary"]["overall_average"] == pytest.approx(sum(paper.values()) / 4)
    assert res["summary"]["best_model"][0] == "dinov2" and res["summary"]["worst_model"][0] == "longclip"
    stats = res["statistics_by_model"]["clip"]
    assert (stats["total_images"], stats["valid_pairs"]) == (4, 3)  # the unscored file counts, as in the authors'
    assert stats["min_similarity"] == pytest.approx(0.895) and stats["max_similarity"] == pytest.approx(0.915)
    assert res["similarities_by_model"]["clip"]["9.png"] is None


@pytest.fixture
def folders(tmp_path, demo):
    refs, recons = tmp_path / "refs", tmp_path / "recons"
    refs.mkdir(), recons.mkdir()
    names = ["astronaut", "chelsea", "coffee", "rocket"]
    for name, im in zip(names, demo):
        im.save(refs / f"{name}.png")
    demo[0].resize((96, 96)).save(recons / "astronaut.png")  # exact name, square like the source
    demo[1].resize((90, 60)).save(recons / "recon_chelsea.png")  # recon_ prefix, same aspect
    demo[2].resize((64, 64)).save(recons / "coffee.jpg")  # stem match, different aspect ratio
    (recons / "rocket.png").write_bytes(b"not a png")  # unreadable
    demo[3].save(recons / "orphan.png")  # no reference
    return refs, recons


def test_score_folders_records_every_skip_and_matches_per_pair(folders, reward, demo):
    refs, recons = folders
    res = score_folders(recons, refs, reward)
    assert AUTHOR_KEYS <= set(res)
    sims = res["similarities_by_model"]["clip"]
    assert set(sims) == {"astronaut.png", "recon_chelsea.png", "coffee.jpg", "rocket.png", "orphan.png"}
    assert sims["rocket.png"] is None and sims["orphan.png"] is None
    reasons = {Path(s["file"]).name: s["reason"] for s in res["skipped"]}
    assert "not an image" in reasons["rocket.png"] and "no reference" in reasons["orphan.png"]
    assert res["size_mismatches"][0]["file"] == "coffee.jpg"
    # Independent check of one score: features of each image alone, numpy cosine.
    from PIL import Image

    fx = reward.backbones["dinov2"]
    a = fx(as_image_batch([Image.open(refs / "astronaut.png").convert("RGB")]))[0].numpy()
    b = fx(as_image_batch([Image.open(recons / "astronaut.png").convert("RGB")]))[0].numpy()
    want = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert res["similarities_by_model"]["dinov2"]["astronaut.png"] == pytest.approx(want, abs=1e-5)
    assert res["unified_bench"]["overall"] == pytest.approx(
        np.mean([res["unified_bench"][m] for m in BACKBONE_NAMES]), abs=0.01
    )


def test_size_mismatch_skip_and_error(folders, reward):
    refs, recons = folders
    res = score_folders(recons, refs, reward, on_size_mismatch="skip")
    assert res["similarities_by_model"]["clip"]["coffee.jpg"] is None
    assert any(s["reason"] == "aspect ratio differs" for s in res["skipped"])
    with pytest.raises(ConfigError, match="coffee.jpg is 64x64 but its reference .*coffee.png is 600x400"):
        score_folders(recons, refs, reward, on_size_mismatch="error")


def test_empty_and_unmatched_folders(tmp_path, folders, reward):
    refs, _ = folders
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageLoadError, match="no image files"):
        score_folders(empty, refs, reward)
    other = tmp_path / "other"
    other.mkdir()
    torch.manual_seed(0)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(other / "zzz.png")
    with pytest.raises(ConfigError, match="no reconstruction in .* matches a reference"):
        score_folders(other, refs, reward)


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_score_writes_json_and_html(folders, tmp_path, capsys):
    refs, recons = folders
    out = tmp_path / "res" / "scores.json"
    code, stdout, err = _run(
        ["bench", "score", "--image_path", str(recons), "--ref_image_path", str(refs), "--backbones", "tiny"]
        + ["--models", "clip", "dinov2", "--output", str(out)],
        capsys,
    )
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["model_types"] == ["clip", "dinov2"] and set(res["unified_bench"]) == {"clip", "dinov2", "overall"}
    assert out.with_suffix(".html").is_file() and "overall" in stdout
    assert "skipped" in err and "rocket.png" in err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--backbones", "tiny", "clip=/no/such/folder"], "/no/such/folder does not exist"),
        (["--backbones", "clip=tiny"], "no folder for dinov2"),
        (["--backbones", "vit=tiny"], "NAME=FOLDER"),
        (["--backbones", "missing.yaml"], "missing.yaml: no such file"),
    ],
)
def test_cli_bad_backbones_exit_2(folders, tmp_path, capsys, extra, message):
    refs, recons = folders
    args = ["bench", "score", "--image_path", str(recons), "--ref_image_path", str(refs), "--output"]
    code, _, err = _run(args + [str(tmp_path / "x.json"), "--models", "clip", "dinov2", *extra], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "x.json").exists()


def test_cli_backbones_from_file_and_env(folders, tmp_path, capsys, monkeypatch):
    refs, recons = folders
    spec = tmp_path / "backbones.json"
    spec.write_text(json.dumps({"clip": "/nope/clip"}))
    args = ["bench", "score", "--image_path", str(recons), "--ref_image_path", str(refs), "--models", "clip"]
    code, _, err = _run([*args, "--output", str(tmp_path / "a.json"), "--backbones", str(spec)], capsys)
    assert code == 2 and "/nope/clip does not exist" in err
    monkeypatch.setenv("UAE_FAST_BACKBONES", "tiny")
    code, _, err = _run([*args, "--output", str(tmp_path / "b.json")], capsys)
    assert code == 0, err
    monkeypatch.delenv("UAE_FAST_BACKBONES")
    code, _, err = _run([*args, "--output", str(tmp_path / "c.json")], capsys)
    assert code == 2 and "no backbone folders" in err


def test_cli_missing_folder(tmp_path, capsys):
    args = ["bench", "score", "--image_path", str(tmp_path / "nope"), "--ref_image_path", str(tmp_path)]
    code, _, err = _run([*args, "--output", str(tmp_path / "x.json"), "--backbones", "tiny"], capsys)
    assert code == 2 and "--image_path" in err and "no such folder" in err
