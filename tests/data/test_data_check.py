"""`uae-fast data check`: each kind of problem found and counted exactly; exit 0 only when clean (or within
--allow), 1 otherwise, 2 with one line for bad usage."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from uae_fast.cli import main
from uae_fast.data.check import PROBLEM_KINDS, check_shards
from uae_fast.data.shard_io import write_shard


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _clean(folder, shards: int = 2, per_shard: int = 3) -> None:
    folder.mkdir()
    for s in range(shards):
        samples = [
            {"key": f"k{s}_{i}", "image": _png(s * 10 + i), "ext": "png", "caption": f"pair {s} {i}"}
            for i in range(per_shard)
        ]
        write_shard(folder / f"shard-{s:06d}.tar", samples)


def _raw(path, records) -> None:
    from webdataset import TarWriter

    with open(path, "wb") as stream:
        writer = TarWriter(stream, encoder=False)
        for r in records:
            writer.write(r)
        writer.close()


def test_clean_shards_pass(tmp_path, capsys):
    _clean(tmp_path / "s")
    assert main(["data", "check", str(tmp_path / "s")]) == 0
    assert "checked 6 sample(s) in 2 shard(s): 6 ok, 0 problem(s)" in capsys.readouterr().out


def test_each_problem_found_and_counted(tmp_path, capsys):
    _clean(tmp_path / "s")
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(jpeg, "JPEG")
    _raw(
        tmp_path / "s" / "shard-000002.tar",
        [
            {"__key__": "bad_image", "jpg": jpeg.getvalue()[:60], "txt": b"a caption"},
            {"__key__": "empty", "png": _png(100), "txt": b" \n"},
            {"__key__": "latin1", "png": _png(101), "txt": "na\xefve".encode("latin-1")},
            {"__key__": "k0_0", "png": _png(102), "txt": b"key already in shard 0"},
            {"__key__": "copy", "png": _png(1), "txt": b"same pixels as k0_1"},
            {"__key__": "no_caption", "png": _png(103)},
            {"__key__": "fine", "png": _png(104), "txt": b"ok"},
            {"__key__": "fine", "png": _png(105), "txt": b"repeated key in this shard"},
        ],
    )
    whole = (tmp_path / "s" / "shard-000001.tar").read_bytes()
    # A truncated copy: its two whole samples are duplicates, the cut third is dropped with the shard's problem.
    (tmp_path / "s" / "shard-000003.tar").write_bytes(whole[:-3000])
    report_path = tmp_path / "report.json"
    assert main(["data", "check", str(tmp_path / "s"), "--report", str(report_path)]) == 1
    report = json.loads(report_path.read_text())
    expected = {
        "corrupt_image": 1,
        "empty_caption": 1,
        "non_utf8_caption": 1,
        "missing_caption": 1,
        "duplicate_key": 2 + 2,  # k0_0 across shards, "fine" within one, k1_0 and k1_1 again in the cut copy
        "duplicate_image": 1,
        "corrupt_shard": 1,
    }
    assert report["counts"] == {kind: expected.get(kind, 0) for kind in PROBLEM_KINDS}
    assert len(report["problems"]) == sum(expected.values())
    assert report["ok"] == 6 + 1  # the clean shards and "fine"
    where = {(p["kind"], p["where"]) for p in report["problems"]}
    assert ("corrupt_image", "shard-000002.tar/bad_image") in where
    assert ("duplicate_image", "shard-000002.tar/copy") in where
    assert ("corrupt_shard", "shard-000003.tar") in where
    out = capsys.readouterr().out
    assert f"{sum(expected.values())} problem(s)" in out and "duplicate_key 4" in out
    total = sum(expected.values())
    assert main(["data", "check", str(tmp_path / "s"), "--allow", str(total)]) == 0
    assert main(["data", "check", str(tmp_path / "s"), "--allow", str(total - 1)]) == 1


def test_captions_jsonl_folder(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(_png(i))
    lines = [{"image": "0.png", "caption": "zero"}, {"image": "1.png", "caption": ""}, {"image": "9.png"}]
    lines += [{"image": "2.png", "caption": "two"}, {"image": "0.png", "caption": "again"}]
    (folder / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + "not json\n")
    report = check_shards(folder)
    kinds = {kind: n for kind, n in report["counts"].items() if n}
    assert kinds == {"empty_caption": 1, "missing_image": 1, "duplicate_key": 1, "bad_record": 1}
    assert report["ok"] == 2 and report["samples"] == 6


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["data", "check", "{missing}"], "no such folder"),
        (["data", "check", "{empty}"], "no .tar shards and no captions.jsonl"),
        (["data", "check", "{empty}", "--allow", "-1"], "--allow must be >= 0"),
    ],
)
def test_bad_usage_exits_2_with_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    argv = [a.format(missing=tmp_path / "missing", empty=tmp_path / "empty") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
