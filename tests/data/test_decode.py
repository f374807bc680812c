"""Every decoder backend available here against Pillow (`load_image`, the independent reference).

Tolerances, measured on this machine: DALI's CPU decoder, simplejpeg and Pillow all run libjpeg-turbo with the
accurate integer IDCT and "fancy" chroma upsampling, and were found identical on every JPEG here, so CPU paths
must match exactly. nvJPEG (DALI's GPU decoder) uses its own IDCT and upsampling; it could not be measured here
(no GPU), so its bound (max 4 levels, mean 0.5) is a stated allowance, not a measurement. PNG is lossless: exact
on every path.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from uae_fast.data.decode import ImageDecoder, _apply_orientation, available_backends, decode_images
from uae_fast.data.images import load_image
from uae_fast.data.preprocess import qwen_grid_thw, qwen_preprocess, qwen_preprocess_bytes
from uae_fast.errors import ImageLoadError

BACKENDS = available_backends()


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(name: str, w: int, h: int) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((w, h), Image.BILINEAR)


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    exif = Image.Exif()
    exif[274] = 6  # rotate 90 degrees clockwise on display
    return {
        "jpeg420": _encode(_photo("astronaut", 517, 333), "JPEG", quality=90),
        "jpeg444": _encode(_photo("coffee", 300, 211), "JPEG", quality=95, subsampling=0),
        "jpeg_odd": _encode(_photo("chelsea", 31, 17), "JPEG", quality=80),
        "gray": _encode(_photo("rocket", 120, 90).convert("L"), "JPEG"),
        "cmyk": _encode(_photo("coffee", 64, 48).convert("CMYK"), "JPEG"),
        "rotated": _encode(_photo("chelsea", 90, 60), "JPEG", exif=exif.tobytes()),
        "png": _encode(_photo("retina", 70, 50), "PNG"),
        "png_rgba": _encode(_photo("astronaut", 40, 30).convert("RGBA"), "PNG"),
        "webp": _encode(_photo("rocket", 50, 40), "WEBP", lossless=True),
    }


def _tolerance(backend: str) -> tuple[int, float]:
    return (4, 0.5) if backend == "dali-mixed" else (0, 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_pillow(files, backend):
    names = list(files)
    with ImageDecoder(backend, threads=2) as dec:
        out = dec.decode([files[n] for n in names])
        sizes = dec.sizes([files[n] for n in names])
    max_tol, mean_tol = _tolerance(backend)
    for name, arr, size in zip(names, out, sizes):
        want = np.asarray(load_image(files[name]))
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape == want.shape, name
        assert arr.flags["C_CONTIGUOUS"], name
        assert tuple(size) == want.shape[:2], name
        diff = np.abs(arr.astype(np.int16) - want)
        if name.startswith("png") or name == "webp":
            assert diff.max() == 0, name  # lossless: exact everywhere
        else:
            assert diff.max() <= max_tol and diff.mean() <= mean_tol, (name, diff.max(), diff.mean())


def test_all_backends_agree(files):
    data = list(files.values())
    results = {b: decode_images(data, backend=b) for b in BACKENDS}
    first = results[BACKENDS[-1]]  # cpu
    for backend, out in results.items():
        max_tol, _ = _tolerance(backend)
        for a, b in zip(out, first):
            assert np.abs(a.astype(np.int16) - b).max() <= max_tol, backend


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(orientation):
    base = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    img = Image.fromarray(base)
    exif = Image.Exif()
    exif[274] = orientation
    ref = np.asarray(load_image(_encode(img, "PNG", exif=exif.tobytes())))
    np.testing.assert_array_equal(_apply_orientation(base, orientation), ref)


def test_rotated_jpeg_through_fast_path(files):
    out = decode_images([files["rotated"]], backend="cpu")[0]
    assert out.shape == (90, 60, 3)
    np.testing.assert_array_equal(out, np.asarray(load_image(files["rotated"])))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_name_the_image(files, backend):
    good = files["jpeg420"]
    cases = {
        "corrupt": (b"\xff\xd8\xff" + b"\x00garbage" * 20, "corrupt"),
        "truncated": (good[: len(good) // 2], "corrupt or truncated"),
        "empty": (b"", "empty data"),
        "not an image": (b"hello world, not an image", "not an image"),
    }
    with ImageDecoder(backend) as dec:
        for label, (blob, message) in cases.items():
            with pytest.raises(ImageLoadError, match=rf"^image 2: .*{message}"):
                dec.decode([good, files["png"], blob])
        # The decoder (and a DALI pipeline rebuilt after a failure) keeps working.
        assert dec.decode([good])[0].shape == (333, 517, 3)


def test_huge_image_refused_from_the_header(files):
    with pytest.raises(ImageLoadError, match=r"^image 1: image is too large \(517x333 = 172,161 pixels"):
        decode_images([files["png"], files["jpeg420"]], max_pixels=100_000)
    with pytest.raises(ImageLoadError, match=r"^image 0: image is too large"):
        ImageDecoder("cpu", max_pixels=100).sizes([files["png"]])


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="backend must be"):
        ImageDecoder("opencv")


def test_reduced_decode_keeps_the_grid_and_stays_close(files):
    big = _encode(_photo("astronaut", 1600, 1200), "JPEG", quality=92)
    data = [big, files["jpeg420"], files["png"]]
    exact = qwen_preprocess_bytes(data, max_pixels=256 * 256, backend="cpu")
    fast = qwen_preprocess_bytes(data, max_pixels=256 * 256, backend="cpu", reduced_decode=True)
    assert fast["image_grid_thw"].tolist() == exact["image_grid_thw"].tolist()
    diff = (fast["pixel_values"] - exact["pixel_values"]).abs()
    # DCT scaling is a different low-pass than the bicubic antialias: small on average, not exact.
    assert 0 < diff.mean().item() < 0.03  # ~2 grey levels (1 level = 1/(255*std) ~ 0.015)
    dec = ImageDecoder("cpu")
    small = dec.decode([big], min_sizes=[(224, 280)])[0]
    assert small.shape[0] >= 224 and small.shape[1] >= 280 and small.shape[0] < 1200  # 1/4 scale: 300x400
    # The grid always comes from the original header, never from the reduced decode.
    assert qwen_grid_thw(dec.sizes([big]), max_pixels=256 * 256).tolist() == exact["image_grid_thw"][:1].tolist()


def test_bytes_pipeline_equals_processor_on_pillow_decode(files):
    from transformers.models.qwen2_vl import Qwen2VLImageProcessor

    data = [files["jpeg420"], files["gray"], files["cmyk"], files["png_rgba"]]
    ref = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=128 * 128)(
        images=[load_image(d) for d in data], return_tensors="pt"
    )
    ours = qwen_preprocess_bytes(data, max_pixels=128 * 128, threads=2)
    assert ours["image_grid_thw"].tolist() == ref["image_grid_thw"].tolist()
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max().item() == 0.0


def test_reused_decoder_gives_the_same_inputs(files):
    data = [files["jpeg420"], files["png"]]
    with ImageDecoder(BACKENDS[0], threads=2) as dec:
        first = qwen_preprocess_bytes(data, max_pixels=64 * 64, decoder=dec)
        second = qwen_preprocess_bytes(data, max_pixels=64 * 64, decoder=dec)
    assert torch.equal(first["pixel_values"], second["pixel_values"])
    want = qwen_preprocess([np.asarray(load_image(d)) for d in data], max_pixels=64 * 64)
    assert torch.equal(first["pixel_values"], want["pixel_values"])


@pytest.mark.parametrize("threads", [1, 2])
def test_decode_each_streams_the_same_pixels(files, threads):
    data = [files["jpeg420"], files["rotated"], files["png"], files["jpeg_odd"], files["cmyk"]]
    got, sizes = {}, []
    with ImageDecoder("cpu", threads=threads) as dec:
        dec.decode_each(data, lambda i, a: got.__setitem__(i, a.copy()), on_sizes=sizes.append)
        want = dec.decode(data)
    assert sizes[0].tolist() == [list(a.shape[:2]) for a in want]
    for i, a in enumerate(want):
        np.testing.assert_array_equal(got[i], a)
    # A bad image in the middle of a streamed batch still names its index.
    with pytest.raises(ImageLoadError, match=r"^image 1: "):
        qwen_preprocess_bytes([files["jpeg420"], files["jpeg420"][:200], files["png"]], backend="cpu", threads=threads)


def test_qwen_batch_needs_every_image():
    from uae_fast import _C

    batch = _C.QwenBatch([(40, 50), (30, 30)], 56 * 56, 64 * 64, 14, 2, 2, [0.5] * 3, [0.5] * 3)
    batch.put(0, np.zeros((40, 50, 3), np.uint8))
    with pytest.raises(ValueError, match="image 1 was never put"):
        batch.result()
    with pytest.raises(ValueError, match="out of range"):
        batch.put(2, np.zeros((40, 50, 3), np.uint8))
