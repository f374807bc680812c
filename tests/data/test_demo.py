"""The demo photographs load offline from scikit-image as deterministic RGB images."""

from __future__ import annotations

import numpy as np

from uae_fast.data import DEMO_IMAGE_NAMES, LoadedImage, demo_images


def test_demo_images_are_real_rgb_photographs():
    images = demo_images()
    assert [x.name for x in images] == list(DEMO_IMAGE_NAMES) == ["astronaut", "chelsea", "coffee", "rocket"]
    for item in images:
        assert isinstance(item, LoadedImage) and item.path is None
        assert item.image.mode == "RGB"
        assert min(item.image.size) > 100
        pixels = np.asarray(item.image)
        assert pixels.std() > 20  # a photograph, not a flat placeholder


def test_demo_images_are_deterministic():
    first, second = demo_images(), demo_images()
    for a, b in zip(first, second):
        assert a.image.size == b.image.size
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert first[0].image.size == (512, 512)  # astronaut
