"""The compiled extension: smart_resize must equal transformers' Python rule exactly."""

from __future__ import annotations

import random

import pytest
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

from uae_fast import _C


def _cases():
    rng = random.Random(0)
    fixed = [(1, 1), (28, 28), (42, 70), (14, 14), (224, 448), (1024, 1024), (20, 3999), (4000, 21), (513, 771)]
    fixed += [(28 * k + 14, 28 * j + 14) for k in range(1, 6) for j in range(1, 6)]  # exact .5 ties
    return fixed + [(rng.randint(1, 5000), rng.randint(1, 5000)) for _ in range(3000)]


@pytest.mark.parametrize("limits", [(56 * 56, 14 * 14 * 4 * 1280), (3136, 65536), (3136, 128 * 128), (0, 1 << 40)])
def test_smart_resize_matches_transformers(limits):
    min_pixels, max_pixels = limits
    mismatches = []
    for h, w in _cases():
        try:
            expected = hf_smart_resize(h, w, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
        except ValueError:
            with pytest.raises(ValueError):
                _C.smart_resize(h, w, 28, min_pixels, max_pixels)
            continue
        got = _C.smart_resize(h, w, 28, min_pixels, max_pixels)
        if tuple(got) != tuple(expected):
            mismatches.append(((h, w), got, expected))
    assert not mismatches, mismatches[:5]


def test_smart_resize_refuses_bad_input_with_value_error():
    with pytest.raises(ValueError, match="aspect ratio"):
        _C.smart_resize(20, 20000)
    with pytest.raises(ValueError, match="positive"):
        _C.smart_resize(0, 10)
    with pytest.raises(ValueError, match="min_pixels"):
        _C.smart_resize(100, 100, 28, 5000, 100)


def test_openmp_reported():
    assert isinstance(_C.has_openmp, bool)
    assert _C.openmp_max_threads() >= 1


def test_kernels_package_is_installed_under_uae_fast():
    import uae_fast.kernels

    assert uae_fast.kernels.__name__ == "uae_fast.kernels"
