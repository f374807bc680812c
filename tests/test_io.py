"""Atomic outputs: a failure leaves neither a final nor a temporary file; an existing result is never half-written."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from uae_fast.errors import OutputError
from uae_fast.io import atomic_dir, atomic_path, ensure_output_dir, save_image_atomic, write_text_atomic


class _Boom(Exception):
    pass


def test_atomic_path_success_keeps_suffix_and_renames(tmp_path):
    final = tmp_path / "result.png"
    with atomic_path(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".result.png.tmp-") and tmp.suffix == ".png"
        assert not tmp.exists()
        tmp.write_bytes(b"data")
        assert not final.exists()  # nothing visible until the block succeeds
    assert final.read_bytes() == b"data"
    assert os.listdir(tmp_path) == ["result.png"]


def test_atomic_path_failure_leaves_nothing(tmp_path):
    final = tmp_path / "result.txt"
    with pytest.raises(_Boom):
        with atomic_path(final) as tmp:
            tmp.write_text("half")
            raise _Boom
    assert os.listdir(tmp_path) == []


def test_failed_rewrite_keeps_previous_file_intact(tmp_path):
    final = tmp_path / "caption.txt"
    write_text_atomic(final, "old complete text")
    with pytest.raises(_Boom):
        with atomic_path(final) as tmp:
            tmp.write_text("new but partial")
            raise _Boom
    assert final.read_text() == "old complete text"
    assert os.listdir(tmp_path) == ["caption.txt"]


def test_save_image_atomic_formats(tmp_path):
    img = Image.new("RGBA", (4, 3), (10, 20, 30, 255))
    for name, fmt in (("a.png", "PNG"), ("b.jpg", "JPEG"), ("c.webp", "WEBP"), ("noext", "PNG")):
        path = save_image_atomic(img, tmp_path / name)
        with Image.open(path) as back:
            assert back.format == fmt and back.size == (4, 3)
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.jpg", "c.webp", "noext"]


def test_save_image_failure_leaves_nothing(tmp_path):
    with pytest.raises(OSError, match="CMYK"):  # PNG cannot hold CMYK: Pillow fails inside save()
        save_image_atomic(Image.new("CMYK", (2, 2)), tmp_path / "x.png")
    assert os.listdir(tmp_path) == []


def test_crash_mid_save_never_exposes_partial_image(tmp_path, monkeypatch):
    final = save_image_atomic(Image.new("RGB", (8, 8), (1, 2, 3)), tmp_path / "out.png")
    before = final.read_bytes()

    def half_then_crash(self, fp, *args, **kwargs):
        with open(fp, "wb") as handle:
            handle.write(before[: len(before) // 2])
        raise _Boom

    monkeypatch.setattr(Image.Image, "save", half_then_crash)
    with pytest.raises(_Boom):
        save_image_atomic(Image.new("RGB", (8, 8), (9, 9, 9)), final)
    assert final.read_bytes() == before and os.listdir(tmp_path) == ["out.png"]


def test_write_text_atomic_utf8(tmp_path):
    path = write_text_atomic(tmp_path / "t.json", '{"caption": "café ☕"}\n')
    assert path.read_text(encoding="utf-8") == '{"caption": "café ☕"}\n'


def test_atomic_dir_new_and_replace(tmp_path):
    final = tmp_path / "run"
    with atomic_dir(final) as tmp:
        (tmp / "one.txt").write_text("1")
        assert not final.exists()
    assert sorted(os.listdir(final)) == ["one.txt"]
    with atomic_dir(final) as tmp:
        (tmp / "two.txt").write_text("2")
        assert (final / "one.txt").exists()  # the old result stays readable while the new one is built
    assert sorted(os.listdir(final)) == ["two.txt"]
    assert os.listdir(tmp_path) == ["run"]  # no temporary or "old" folder left behind


def test_atomic_dir_failure_keeps_old(tmp_path):
    final = tmp_path / "run"
    final.mkdir()
    (final / "keep.txt").write_text("keep")
    with pytest.raises(_Boom):
        with atomic_dir(final) as tmp:
            (tmp / "partial.txt").write_text("x")
            raise _Boom
    assert os.listdir(final) == ["keep.txt"] and os.listdir(tmp_path) == ["run"]


def test_atomic_dir_onto_file_raises(tmp_path):
    target = tmp_path / "run"
    target.write_text("a file")
    with pytest.raises(OutputError, match="exists and is a file"):
        with atomic_dir(target):
            pass
    assert os.listdir(tmp_path) == ["run"]


def test_ensure_output_dir(tmp_path):
    nested = ensure_output_dir(tmp_path / "a" / "b")
    assert nested.is_dir() and ensure_output_dir(nested) == nested
    blocker = tmp_path / "results.png"
    blocker.write_bytes(b"x")
    with pytest.raises(OutputError) as info:
        ensure_output_dir(blocker)
    message = str(info.value)
    assert message.startswith(f"--out {blocker} exists and is a file, not a folder") and "\n" not in message
    with pytest.raises(OutputError, match=r"cannot be created"):
        ensure_output_dir(blocker / "sub")
