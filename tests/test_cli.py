"""`uae-fast` command line: outputs, determinism, input handling and one-line errors (exit status 2)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uae_fast.cli import main

DEMO = ["astronaut", "chelsea", "coffee", "rocket"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def files(folder: Path) -> list[str]:
    """Every entry of ``folder``, hidden ones included (temporaries start with '.'); [] if it does not exist."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "captions.jsonl").read_text(encoding="utf-8").splitlines()]


def assert_one_error(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("uae-fast: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, demo) -> Path:
    """Good and bad inputs: photos/ holds one.jpg and two.png; the bad files sit next to it."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "photos").mkdir()
    demo[0].crop((100, 0, 400, 300)).resize((48, 48)).save(d / "photos" / "one.jpg", quality=90)
    demo[1].resize((56, 40)).save(d / "photos" / "two.png")
    demo[2].resize((128, 96)).save(d / "full.jpg", quality=90)
    data = (d / "full.jpg").read_bytes()
    (d / "half.jpg").write_bytes(data[: len(data) // 2])
    (d / "x.jpg").write_text("not an image\n")
    Image.new("L", (20000, 20)).save(d / "wide.png")
    (d / "afile").write_text("keep")
    (d / "bad.jsonl").write_text('{"caption": "a cat"}\n{"text": "no caption key"}\n')
    (d / "number.jsonl").write_text('{"caption": 5}\n')
    (d / "latin1.txt").write_bytes(b"caf\xe9\n")
    return d


# ------------------------------------------------------------------ end to end through the console script
@pytest.mark.slow
def test_console_script_reconstructs_demo(tmp_path, capsys):
    exe = shutil.which("uae-fast")
    assert exe, "the uae-fast console script is not installed"
    out = tmp_path / "out"
    proc = subprocess.run(
        [exe, "reconstruct", "--demo", "--preset", "tiny", "--out", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "wrote 4 reconstruction(s)" in proc.stderr
    assert files(out) == sorted([f"{n}.png" for n in DEMO] + ["captions.jsonl"])  # no '.tmp' leftovers
    for name in DEMO:
        with Image.open(out / f"{name}.png") as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (64, 64))
    table = rows(out)
    assert [r["image"] for r in table] == [f"{n}.png" for n in DEMO]
    assert [r["name"] for r in table] == DEMO
    assert all(isinstance(r["caption"], str) for r in table)
    # The same run in this process gives the same bytes: nothing depends on process state.
    assert run(capsys, "reconstruct", "--demo", "--out", tmp_path / "again")[0] == 0
    for name in files(out):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


@pytest.mark.slow
def test_console_script_help_and_error_status(tmp_path):
    exe = shutil.which("uae-fast")
    assert exe
    top = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert top.returncode == 0 and all(c in top.stdout for c in ("caption", "generate", "reconstruct"))
    rec = subprocess.run([exe, "reconstruct", "--help"], capture_output=True, text=True)
    assert rec.returncode == 0
    for option in ("--demo", "--out", "--preset", "--seed", "--skip-bad", "--num-generations", "--size"):
        assert option in rec.stdout, option
    missing, out = tmp_path / "nope.png", tmp_path / "o"
    bad = subprocess.run([exe, "reconstruct", str(missing), "--out", str(out)], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.splitlines() == [f"uae-fast: error: {missing}: no such file"]
    assert not out.exists()


# ------------------------------------------------------------------ in process
def test_same_seed_same_bytes_other_seed_differs(inputs, tmp_path, capsys):
    outs = {}
    for key, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert run(capsys, "reconstruct", inputs / "photos", "--seed", seed, "--out", tmp_path / key)[0] == 0
        outs[key] = {n: (tmp_path / key / n).read_bytes() for n in files(tmp_path / key)}
    assert sorted(outs["a"]) == ["captions.jsonl", "one.png", "two.png"]
    assert outs["a"] == outs["b"]
    assert outs["a"].keys() == outs["c"].keys() and outs["a"] != outs["c"]


def test_folder_and_explicit_files(inputs, tmp_path, capsys):
    photos = inputs / "photos"
    code, out, err = run(capsys, "reconstruct", photos, "--out", tmp_path / "dir")
    assert code == 0 and out == "" and "wrote 2 reconstruction(s)" in err
    assert files(tmp_path / "dir") == ["captions.jsonl", "one.png", "two.png"]
    assert [(r["name"], r["source"]) for r in rows(tmp_path / "dir")] == [
        ("one", str(photos / "one.jpg")),
        ("two", str(photos / "two.png")),
    ]
    args = ("reconstruct", photos / "two.png", photos / "one.jpg", "--size", 32, "--batch-size", 1)
    assert run(capsys, *args, "--out", tmp_path / "files")[0] == 0
    assert [r["image"] for r in rows(tmp_path / "files")] == ["two.png", "one.png"]  # input order kept
    with Image.open(tmp_path / "files" / "one.png") as im:
        assert (im.mode, im.size) == ("RGB", (32, 32))


def test_num_generations(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, "reconstruct", inputs / "photos", "--num-generations", 2, "--out", out)[0] == 0
    assert files(out) == ["captions.jsonl", "one_g0.png", "one_g1.png", "two_g0.png", "two_g1.png"]
    assert [(r["name"], r["image"]) for r in rows(out)] == [
        ("one", "one_g0.png"),
        ("one", "one_g1.png"),
        ("two", "two_g0.png"),
        ("two", "two_g1.png"),
    ]


def test_alpha_gray_and_16_bit_pngs_are_converted(demo, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    rgba = demo[2].resize((40, 40)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((40, 40)))
    rgba.save(src / "rgba.png")
    demo[3].resize((40, 48)).convert("L").save(src / "gray.png")
    Image.fromarray((np.asarray(demo[0].resize((40, 40)).convert("L"), np.uint16) * 257)).save(src / "deep.png")
    with Image.open(src / "deep.png") as im:
        assert im.mode == "I;16"  # really a 16-bit PNG
    code, _, err = run(capsys, "reconstruct", src, "--out", tmp_path / "out")
    assert code == 0, err
    assert files(tmp_path / "out") == ["captions.jsonl", "deep.png", "gray.png", "rgba.png"]


ERROR_CASES = {
    "missing": (["reconstruct", "{d}/missing.png"], ["missing.png", "no such file"]),
    "text": (["reconstruct", "{d}/x.jpg"], ["x.jpg", "not an image"]),
    "truncated": (["reconstruct", "{d}/half.jpg"], ["half.jpg", "truncated"]),
    "aspect": (["caption", "{d}/wide.png"], ["wide.png", "aspect ratio", "200"]),
    "out-is-file": (["reconstruct", "{d}/photos", "--out", "{d}/afile"], ["--out", "afile", "is a file"]),
    "empty-caption": (["generate", ""], ["caption 1", "empty"]),
    "no-captions-file": (["generate", "--captions-file", "{d}/nope.txt"], ["--captions-file", "nope.txt", "no such"]),
    "no-caption-key": (["generate", "--captions-file", "{d}/bad.jsonl"], ["bad.jsonl:2", "'caption'"]),
    "batch-size": (["reconstruct", "{d}/photos", "--batch-size", "0"], ["--batch-size", ">= 1", "0"]),
    "no-images": (["reconstruct"], ["IMAGE", "--demo"]),
    "preset": (
        ["reconstruct", "{d}/photos", "--preset", "/nonexistent/folder"],
        ["/nonexistent/folder", "not a preset"],
    ),
    "size": (["reconstruct", "{d}/photos", "--size", "30"], ["--size", "got 30", "multiple", "8"]),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_input_is_one_line_exit_2(case, inputs, tmp_path, capsys):
    template, fragments = ERROR_CASES[case]
    argv = [a.format(d=inputs) for a in template]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert_one_error(*run(capsys, *argv), *fragments)
    assert files(tmp_path / "out") == []  # nothing written (at most an empty folder)
    assert (inputs / "afile").read_text() == "keep"


def test_skip_bad(inputs, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(inputs / "photos" / "one.jpg", src / "good.jpg")
    shutil.copy(inputs / "x.jpg", src / "broken.png")
    code, _, err = run(capsys, "reconstruct", src, tmp_path / "gone.jpg", "--skip-bad", "--out", tmp_path / "out")
    assert code == 0, err
    assert files(tmp_path / "out") == ["captions.jsonl", "good.png", "skipped.json"]
    assert [r["name"] for r in rows(tmp_path / "out")] == ["good"]
    skipped = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert [Path(s["source"]).name for s in skipped] == ["broken.png", "gone.jpg"]
    assert "not an image" in skipped[0]["reason"] and "no such file" in skipped[1]["reason"]
    assert "uae-fast: skipped 2 unreadable image(s)" in err


def test_caption_command(inputs, tmp_path, capsys):
    code, out, _ = run(capsys, "caption", inputs / "photos", "--out", tmp_path / "out")
    assert code == 0
    printed = [line.split("\t", 1) for line in out.splitlines()]
    assert [name for name, _ in printed] == ["one", "two"]
    assert files(tmp_path / "out") == ["captions.jsonl"]
    table = rows(tmp_path / "out")
    assert [(r["name"], r["generation"]) for r in table] == [("one", 0), ("two", 0)]
    for (_, shown), r in zip(printed, table):
        assert isinstance(r["caption"], str)
        if r["caption"].isprintable():  # stdout may escape control characters; the JSONL keeps the raw text
            assert shown == r["caption"]
    assert run(capsys, "caption", inputs / "photos")[1] == out  # without --out: same lines, no files


def test_generate_command(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, "generate", "a cat", "a dog", "--seed", 7, "--out", out)[0] == 0
    assert files(out) == ["0000.png", "0001.png", "captions.jsonl"]
    assert rows(out) == [
        {"image": "0000.png", "caption": "a cat", "seed": 7},
        {"image": "0001.png", "caption": "a dog", "seed": 8},
    ]
    with Image.open(out / "0001.png") as im:
        assert (im.mode, im.size) == ("RGB", (64, 64))
    (tmp_path / "caps.txt").write_text("a red house\nblue sky\n")
    assert run(capsys, "generate", "first", "--captions-file", tmp_path / "caps.txt", "--out", tmp_path / "t")[0] == 0
    assert [r["caption"] for r in rows(tmp_path / "t")] == ["first", "a red house", "blue sky"]


# ------------------------------------------------------------------ regressions: bugs found by review, now fixed


def test_checkpoint_folder_brings_its_inference_defaults(tiny_checkpoint, tmp_path, capsys):
    """A model saved from the tiny preset renders at the tiny preset's size (64), not the official 1024."""
    out = tmp_path / "out"
    assert run(capsys, "generate", "a cat", "--preset", tiny_checkpoint, "--out", out)[0] == 0
    with Image.open(out / "0000.png") as im:
        assert im.size == (64, 64)


def test_quiet_libraries_is_public():
    import transformers

    import uae_fast.cli

    assert "quiet_libraries" in uae_fast.cli.__all__
    transformers.logging.set_verbosity_info()
    uae_fast.cli.quiet_libraries()
    assert transformers.logging.get_verbosity() == transformers.logging.ERROR


def test_output_names_unique_across_batches(inputs, tmp_path, capsys):
    for sub, name in (("d1", "img.png"), ("d2", "img.jpg"), ("d2", "astronaut.png")):
        (tmp_path / sub).mkdir(exist_ok=True)
        shutil.copy(inputs / "photos" / "two.png", tmp_path / sub / name)
    out = tmp_path / "out"
    assert (
        run(capsys, "reconstruct", "--demo", tmp_path / "d1", tmp_path / "d2", "--batch-size", 2, "--out", out)[0] == 0
    )
    images = [r["image"] for r in rows(out)]
    assert len(images) == 7 and len(set(images)) == 7  # nothing silently overwritten
    assert sorted(images) == [n for n in files(out) if n.endswith(".png")]


def test_failure_in_later_batch_writes_nothing(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ("reconstruct", inputs / "photos" / "one.jpg", inputs / "x.jpg", "--batch-size", 1, "--out", out)
    assert_one_error(*run(capsys, *argv), "x.jpg")
    assert files(out) == []


@pytest.mark.parametrize("name", ["number.jsonl", "latin1.txt"])
def test_captions_file_bad_content_is_one_line(name, inputs, tmp_path, capsys):
    assert_one_error(*run(capsys, "generate", "--captions-file", inputs / name, "--out", tmp_path / "o"), name)


def test_caption_stdout_is_one_line_per_image(inputs, monkeypatch, capsys):
    from uae_fast import api

    monkeypatch.setattr(api.UAE, "caption", lambda self, images, **kw: ["two\nlines\tand a tab"] * len(images))
    code, out, _ = run(capsys, "caption", inputs / "photos")
    assert code == 0
    assert [line.split("\t")[0] for line in out.splitlines()] == ["one", "two"]
    assert all(line.count("\t") == 1 for line in out.splitlines())


def test_skip_bad_with_nothing_readable_is_an_error(inputs, tmp_path, capsys):
    code, _, err = run(capsys, "reconstruct", inputs / "x.jpg", "--skip-bad", "--out", tmp_path / "out")
    assert code == 2 and "no readable images" in err
    assert files(tmp_path / "out") == ["skipped.json"]  # the reason is kept, no empty captions.jsonl


def test_numeric_options_fail_before_anything_is_written(inputs, tmp_path, capsys):
    for option in ("--steps", "--num-generations"):
        argv = ("reconstruct", inputs / "photos", option, 0, "--out", tmp_path / "out")
        assert_one_error(*run(capsys, *argv), option, ">= 1")
        assert not (tmp_path / "out").exists()
