"""`uae-fast data build`: the captioner's pairs land in shards that read back exactly, filters say why, a rerun
redoes only missing shards (byte-identical), and bad usage is one line with exit status 2."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from uae_fast.cli import main
from uae_fast.data.build import repetition_ratio
from uae_fast.data.demo import DEMO_IMAGE_NAMES, demo_images
from uae_fast.data.shard_io import resolve_shards, sample_caption

torch.set_num_threads(1)


@pytest.fixture
def cached_tiny(monkeypatch, tiny):
    """`uae_fast.load("tiny")` returns the session's tiny UAE (the same weights: seed 0), so builds skip the load."""
    import uae_fast.api

    real = uae_fast.api.load
    monkeypatch.setattr(uae_fast.api, "load", lambda name, **kw: tiny if name == "tiny" else real(name, **kw))
    return tiny


def _read(folder) -> dict[str, tuple[bytes, str, str]]:
    """key -> (image bytes, caption, shard name) of every sample."""
    out = {}
    for shard in resolve_shards(folder):
        for sample in shard.samples():
            assert sample.problem is None
            out[sample.key] = (sample.image, sample_caption(sample), shard.name)
    return out


def test_build_demo_end_to_end_then_resume(tmp_path, cached_tiny, capsys):
    out = tmp_path / "shards"
    argv = ["data", "build", "--demo", "--preset", "tiny", "--out", str(out), "--shard-size", "3"]
    argv += ["--min-words", "1", "--max-repetition", "1", "--max-new-tokens", "6", "--batch-size", "2"]
    assert main(argv) == 0
    shards = sorted(p.name for p in out.glob("*.tar"))
    assert shards == ["shard-000000.tar", "shard-000001.tar"]
    pairs = _read(out)
    assert sorted(pairs) == [f"{i:07d}-{n}" for i, n in enumerate(sorted(DEMO_IMAGE_NAMES))]
    assert [pairs[k][2] for k in sorted(pairs)] == ["shard-000000.tar"] * 3 + ["shard-000001.tar"]
    for item in demo_images():  # the stored images are the demo photographs, pixel for pixel
        (key,) = [k for k in pairs if k.endswith(item.name)]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(pairs[key][0])).convert("RGB")), np.asarray(item.image))
    # The captions are the captioner's (the tiny one: gibberish), each image's own.
    assert all(pairs[k][1] for k in pairs)
    assert len({pairs[k][1] for k in pairs}) == 4
    stats = json.loads((out / "stats.json").read_text())
    assert stats["count"] == 4 and stats["shards"] == 2 and stats["skipped"] == []
    assert sum(b["count"] for b in stats["histogram"]) == 4
    assert stats["words"]["max"] == max(len(pairs[k][1].split()) for k in pairs)
    assert "<table>" in (out / "stats.html").read_text()
    assert "wrote 4 pair(s) in 2 shard(s)" in capsys.readouterr().err

    first, second = (out / "shard-000000.tar").stat(), (out / "shard-000001.tar").read_bytes()
    (out / "shard-000001.tar").unlink()
    assert main(argv) == 0
    assert (out / "shard-000001.tar").read_bytes() == second  # rebuilt byte for byte
    again = (out / "shard-000000.tar").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # untouched
    assert json.loads((out / "stats.json").read_text())["shards_resumed"] == 1
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # no temporaries left behind

    # Other settings on the same folder: refused in one line, nothing touched.
    assert main([*argv[:-2], "--batch-size", "4"]) == 2
    assert "other settings (batch_size: 2 then, 4 now)" in capsys.readouterr().err


def test_build_folder_filters_and_skips(tmp_path, monkeypatch):
    """Bad files and filtered captions are skipped with the reason; the captioner is stubbed (the filters are the
    subject here), so this runs without a model."""
    from uae_fast.data import build

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.png", "d.bmp", "e.png"):
        Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(images / name)
    (images / "c.png").write_bytes((images / "b.png").read_bytes()[:200])  # truncated
    captions = {
        "a.jpg": "a photo of a red bus parked beside a tall brick building",
        "b.png": "short one",
        "d.bmp": "the cat the cat the cat the cat the cat the cat the cat",
        "e.png": "a tidy kitchen with white cupboards and a wooden table in the morning sun",
    }

    def fake_caption(self, blobs, shard, batch):
        return [captions[n] for n in sorted(captions) if any(b == (images / n).read_bytes() for b in blobs)]

    monkeypatch.setattr(build._Builder, "_caption", fake_caption)
    out = tmp_path / "shards"
    argv = ["data", "build", "--images", str(images), "--out", str(out), "--shard-size", "2", "--min-words", "5"]
    assert main([*argv, "--max-repetition", "0.4"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    reasons = {s["image"]: s["reason"] for s in stats["skipped"]}
    assert set(reasons) == {"b.png", "c.png", "d.bmp"}
    assert "caption too short (2 words < --min-words 5)" in reasons["b.png"]
    assert "repeats itself (repetition 0.83 > --max-repetition 0.4)" in reasons["d.bmp"]
    assert "c.png" in reasons["c.png"] and "corrupt" in reasons["c.png"]
    assert stats["count"] == 2 and stats["images"] == 5 and stats["shards"] == 3
    assert stats["skipped_by_reason"] == {
        "caption too short": 1,
        "caption repeats itself": 1,
        "corrupt or truncated image data": 1,
    }
    pairs = _read(out)
    assert {k: v[1] for k, v in pairs.items()} == {"0000000-a": captions["a.jpg"], "0000004-e": captions["e.png"]}
    assert pairs["0000000-a"][0] == (images / "a.jpg").read_bytes()  # stored as the original bytes
    assert (out / "shard-000001.tar").is_file()  # c.png and d.bmp: an empty but finished shard
    assert "c.png" in (out / "stats.html").read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--shard-size", "0"], "--shard-size must be >= 1"),
        (["--max-repetition", "2"], "--max-repetition must be in [0, 1]"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--preset", "nope"], "--preset nope: not a preset"),
    ],
)
def test_bad_usage_is_one_line(tmp_path, capsys, extra, message):
    assert main(["data", "build", "--demo", "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_image_folder(tmp_path, capsys):
    assert main(["data", "build", "--images", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_repetition_ratio():
    assert repetition_ratio("one two three four five") == 0.0
    assert repetition_ratio("a b c a b c a b c") == pytest.approx(1 - 3 / 7)
    assert repetition_ratio("go go go go go go") == pytest.approx(1 - 1 / 4)
    assert repetition_ratio("two words") == 0.0
