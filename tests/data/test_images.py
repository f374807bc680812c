"""Every bad input becomes a one-line ImageLoadError naming the file; every good one becomes correct RGB pixels."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from uae_fast.data import LoadedImage, Skipped, list_image_files, load_image, load_images
from uae_fast.errors import ImageLoadError


def _png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """Hand-made PNG: lets a test claim any header size or write 16-bit RGB, which Pillow cannot save."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _photo(width: int = 64, height: int = 48) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _error(source, **kwargs) -> str:
    with pytest.raises(ImageLoadError) as info:
        load_image(source, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("definitely not a JPEG\n")
    message = _error(path)
    assert message.startswith("notes.jpg: ") and "not an image" in message


def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    _photo(256, 256).save(buf, "JPEG", quality=95)
    path = tmp_path / "half.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    message = _error(path)
    assert message.startswith("half.jpg: ") and "truncated" in message


def test_truncated_jpeg_even_if_another_library_allows_truncation(tmp_path, monkeypatch):
    buf = io.BytesIO()
    _photo(256, 256).save(buf, "JPEG")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert "truncated" in _error(buf.getvalue()[:2000])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the global is restored


def test_empty_missing_and_directory(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert _error(empty).startswith("empty.png: empty file")
    assert _error(tmp_path / "ghost.png").startswith("ghost.png: no such file")
    folder = tmp_path / "pics.png"
    folder.mkdir()
    message = _error(folder)
    assert message.startswith("pics.png: ") and "directory" in message
    assert _error(b"").startswith("<bytes>: empty")
    assert _error(b"garbage", name="upload-7").startswith("upload-7: not an image")


def test_grayscale_to_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (5, 4), 77).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (5, 4)
    assert img.getpixel((2, 2)) == (77, 77, 77)


def test_rgba_composited_over_white(tmp_path):
    rgba = Image.new("RGBA", (3, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))  # fully transparent black must become white, not black
    rgba.putpixel((2, 0), (255, 0, 0, 128))
    path = tmp_path / "alpha.png"
    rgba.save(path)
    img = load_image(path)
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 0, 0)
    assert img.getpixel((1, 0)) == (255, 255, 255)
    r, g, b = img.getpixel((2, 0))
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1


def test_la_and_palette_with_transparency(tmp_path):
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    path = tmp_path / "pal.png"
    pal.save(path, transparency=0)
    img = load_image(path)
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 0)) == (255, 0, 0)
    la = Image.new("LA", (1, 1), (10, 0))
    assert load_image(la).getpixel((0, 0)) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "print.jpg"
    cmyk = Image.new("CMYK", (16, 8), (0, 0, 0, 0))
    cmyk.paste((255, 0, 0, 0), (8, 0, 16, 8))  # right half pure cyan
    cmyk.save(path, "JPEG", quality=100)
    img = load_image(path)
    assert img.mode == "RGB"
    assert all(abs(a - b) <= 3 for a, b in zip(img.getpixel((2, 4)), (255, 255, 255)))
    assert all(abs(a - b) <= 3 for a, b in zip(img.getpixel((13, 4)), (0, 255, 255)))


def test_16bit_gray_png_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 257, 32768, 65535]], dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I;16")  # the case Pillow's convert("RGB") gets wrong
    pixels = np.asarray(load_image(path))
    assert pixels[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (pixels[..., 0] == pixels[..., 2]).all()


def test_16bit_rgb_png(tmp_path):
    values = np.array([[[65535, 32768, 0]]], dtype=">u2")
    path = tmp_path / "deep_rgb.png"
    path.write_bytes(_png_bytes(1, 1, 16, 2, b"\x00" + values.tobytes()))
    assert load_image(path).getpixel((0, 0)) == (255, 128, 0)


def test_int32_and_float_modes():
    assert load_image(Image.fromarray(np.array([[65535, 70000, -5]], dtype=np.int32))).getpixel((1, 0)) == (255,) * 3
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert [load_image(unit).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    wide = Image.fromarray(np.array([[2.0, 300.0, float("nan")]], dtype=np.float32))
    assert [load_image(wide).getpixel((x, 0))[0] for x in range(3)] == [2, 255, 0]


def test_one_by_one_is_valid(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (1, 2, 3)).save(path)
    assert load_image(path).getpixel((0, 0)) == (1, 2, 3)


def test_extreme_aspect_ratio(tmp_path):
    path = tmp_path / "strip.png"
    Image.new("L", (20000, 20)).save(path)
    message = _error(path)
    assert message.startswith("strip.png: aspect ratio 1000:1") and "200" in message
    Image.new("L", (4000, 20)).save(path)  # exactly 200:1 is accepted
    assert load_image(path).size == (4000, 20)


def test_too_many_pixels_small_limit(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 50)).save(path)
    message = _error(path, max_pixels=4999)
    assert message.startswith("big.png: image is too large") and "5,000 pixels" in message
    assert "4,999" in message and "max_pixels" in message
    assert load_image(path, max_pixels=5000).size == (100, 50)


def test_header_size_checked_before_decoding(tmp_path):
    # The header claims 30000x30000 but the file is 400 bytes: the error must come from the header alone, before
    # decoding allocates 900 MB, and Pillow's own DecompressionBombError must surface as our message.
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_bytes(30000, 30000, 8, 0, b"\x00" * 30001 * 10))
    message = _error(path)
    assert message.startswith("bomb.png: image is too large") and "900,000,000" in message
    assert "100,000,000" in message


def test_pillow_bomb_warning_and_error_never_escape(tmp_path, monkeypatch):
    path = tmp_path / "medium.png"
    Image.new("RGB", (80, 80)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path, max_pixels=8000).size == (80, 80)  # 6400 px: Pillow would only warn
        assert load_image(path, max_pixels=10**6).size == (80, 80)  # above Pillow's 2x limit: we decide
    assert Image.MAX_IMAGE_PIXELS == 5000
    assert "too large" in _error(path, max_pixels=6000)


def test_exif_rotation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "phone.jpg"
    img.save(path, "JPEG", exif=exif.tobytes(), quality=95)
    out = load_image(path)
    assert out.size == (20, 40)
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50


def test_pil_source_not_modified_and_bytes_source(tmp_path):
    src = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    out = load_image(src)
    assert out.getpixel((0, 0)) == (255, 255, 255) and src.mode == "RGBA"
    buf = io.BytesIO()
    Image.new("RGB", (3, 3), (9, 8, 7)).save(buf, "PNG")
    assert load_image(buf.getvalue()).getpixel((1, 1)) == (9, 8, 7)


def test_load_images_skip_or_raise(tmp_path):
    good = tmp_path / "a" / "cat.png"
    other = tmp_path / "b" / "cat.jpg"
    bad = tmp_path / "b" / "bad.png"
    for p in (good, other):
        p.parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(p)
    bad.write_text("nope")
    with pytest.raises(ImageLoadError, match=r"^bad\.png: not an image"):
        load_images([good, bad, other])
    loaded, skipped = load_images([good, bad, str(other)], skip_bad=True)
    assert [x.name for x in loaded] == ["cat", "cat-2"]
    assert all(isinstance(x, LoadedImage) and x.image.mode == "RGB" for x in loaded)
    assert loaded[0].path == str(good)
    assert skipped == [Skipped(source=str(bad), reason="bad.png: not an image (unrecognised format)")]


def test_list_image_files(tmp_path):
    for name in ("b.PNG", "a.jpg", "c.webp", "notes.txt", ".a.png.tmp-1234.png", "._d.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_image_files(tmp_path)] == ["a.jpg", "b.PNG", "c.webp"]
    with pytest.raises(ImageLoadError, match="no such folder"):
        list_image_files(tmp_path / "missing")
    with pytest.raises(ImageLoadError, match="not a folder"):
        list_image_files(tmp_path / "a.jpg")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageLoadError, match=r"empty: no image files"):
        list_image_files(empty)
