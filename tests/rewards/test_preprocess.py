"""On-device preprocessing vs the official processors applied to PIL images (transformers, torchvision)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from uae_fast.rewards.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TensorPreprocess,
    as_image_batch,
    preprocess_many,
)

# Stated tolerance (module docstring of uae_fast.rewards.preprocess): per pixel at most 2 levels of 255 before
# normalisation, mean below 0.05 levels.
MAX_LEVELS, MEAN_LEVELS = 2.0 + 1e-3, 0.05  # + float32 rounding of the normalised values


def _official():
    from transformers import BitImageProcessor, CLIPImageProcessor, CLIPImageProcessorPil, DINOv3ViTImageProcessor

    def hf(proc):
        return lambda im: proc(images=im, return_tensors="pt")["pixel_values"], TensorPreprocess.from_image_processor(
            proc
        )

    dinov2 = BitImageProcessor(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        resample=3,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    # LongCLIP's own transform (OpenAI CLIP `_transform`), applied to PIL by torchvision.
    openai = T.Compose(
        [
            T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    return {
        "clip (CLIPImageProcessor)": hf(CLIPImageProcessor()),
        "clip (CLIPImageProcessorPil)": hf(CLIPImageProcessorPil()),
        "dinov2 (BitImageProcessor)": hf(dinov2),
        "dinov3 (DINOv3ViTImageProcessor)": hf(DINOv3ViTImageProcessor()),
        "longclip (OpenAI transform)": (lambda im: openai(im)[None], TensorPreprocess.openai_clip(224)),
    }


OFFICIAL = _official()


@pytest.fixture(scope="module")
def photos(demo):
    # Demo photographs plus awkward sizes: odd crop excess, upscaling from a small image, a 1024² decode.
    extra = [demo[1].resize((300, 199)), demo[0].resize((100, 150)), demo[2].resize((1024, 1024))]
    return demo + extra


def _levels(diff: torch.Tensor, std) -> torch.Tensor:
    return diff.abs() * torch.tensor(std).view(1, 3, 1, 1) * 255.0


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_matches_official_processor_on_pil(name, photos):
    official, ours = OFFICIAL[name]
    for im in photos:
        want = official(im)
        got = ours(as_image_batch([im]))
        assert got.shape == want.shape == (1, 3, 224, 224), im.size
        levels = _levels(got - want, ours.std)
        assert levels.max() <= MAX_LEVELS, (name, im.size, float(levels.max()))
        assert levels.mean() <= MEAN_LEVELS, (name, im.size, float(levels.mean()))


def test_processor_settings_are_read_not_assumed():
    from transformers import BitImageProcessor, DINOv3ViTImageProcessor

    p = TensorPreprocess.from_image_processor(
        BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3)
    )
    assert (p.shortest_edge, p.crop, p.interpolation, p.resize_8bit) == (256, (224, 224), "bicubic", True)
    q = TensorPreprocess.from_image_processor(DINOv3ViTImageProcessor())
    assert (q.size, q.crop, q.interpolation, q.resize_8bit) == ((224, 224), None, "bilinear", False)
    assert q.mean == IMAGENET_MEAN


def test_float_decoder_output_equals_its_png(tiny):
    """A decoded tensor scored directly equals the same image saved as 8-bit PNG and scored from PIL."""
    from uae_fast.api import tensors_to_pil

    x = tiny.generate_tensors(["a cat on a mat"], steps=2, size=128)  # [1, 3, 128, 128] in [0, 1]
    pil = tensors_to_pil(x)[0]
    for _, ours in OFFICIAL.values():
        torch.testing.assert_close(ours(x), ours(as_image_batch([pil])), atol=0, rtol=0)


def test_list_of_sizes_equals_one_by_one(photos):
    p = TensorPreprocess.openai_clip(224)
    images = as_image_batch(photos[:3])
    batch = p(images)
    for i, im in enumerate(images):
        torch.testing.assert_close(batch[i : i + 1], p(im[None]), atol=0, rtol=0)


def test_shared_preprocessing_is_computed_once_per_distinct_setting(photos):
    clip, longclip = TensorPreprocess.openai_clip(224), TensorPreprocess.openai_clip(224)
    dino = TensorPreprocess(size=(224, 224), interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    out = preprocess_many([clip, longclip, dino], as_image_batch(photos[:2]))
    assert len(out) == 2  # equal settings hash alike: CLIP and LongCLIP share one tensor
    torch.testing.assert_close(out[clip], clip(as_image_batch(photos[:2])))


def test_small_image_is_padded_like_the_official_crop():
    from transformers import CLIPImageProcessor

    # Resize keeps 224 on the short side, so only crops larger than the resize pad; compare with a crop of 256.
    proc = CLIPImageProcessor(crop_size={"height": 256, "width": 256})
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (150, 100, 3), dtype=np.uint8))
    want = proc(images=im, return_tensors="pt")["pixel_values"]
    got = TensorPreprocess.from_image_processor(proc)(as_image_batch([im]))
    assert got.shape == want.shape
    assert _levels(got - want, CLIP_STD).max() <= MAX_LEVELS


def test_bad_inputs_raise():
    p = TensorPreprocess.openai_clip(224)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        p(torch.rand(2, 4, 32, 32))
    with pytest.raises(ValueError, match="exactly one"):
        TensorPreprocess(shortest_edge=224, size=(224, 224))
