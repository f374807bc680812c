"""Tiny random-weight versions of the four reward backbones, written to disk in the real checkpoint layouts.

They exist so the reward and Unified-Bench run anywhere in seconds *through the same loading code* as the real
checkpoints: each model is built from a small config with a fixed seed, saved (``save_pretrained`` + the official
processor's ``preprocessor_config.json``, or an OpenAI-format ``longclip-L.pt`` state dict), and loaded back by
:func:`~uae_fast.rewards.backbones.load_backbone`. The preprocessing configs are the real ones (224-pixel inputs),
so the tiny path exercises the real resize / crop / normalisation. Features are meaningless.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import torch

from .preprocess import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["TINY_BACKBONES", "save_tiny_backbones", "tiny_backbone_paths"]

# Widths are small but every structural feature of the real model is kept: DINOv2's 518-px position table (so it is
# interpolated to the 16 x 16 grid as for dinov2-large), DINOv3's register tokens and rope, LongCLIP's
# 248-token text context and QuickGELU layout.
TINY_BACKBONES = {
    "clip": {"hidden": 32, "layers": 2, "heads": 2, "patch": 32, "projection": 24},
    "dinov2": {"hidden": 32, "layers": 2, "heads": 2, "patch": 14, "image_size": 518},
    "dinov3": {"hidden": 32, "layers": 2, "heads": 2, "patch": 16, "registers": 4},
    "longclip": {"width": 64, "layers": 2, "patch": 32, "embed_dim": 24, "context": 248},
}

_PATHS: dict[int, dict[str, Path]] = {}


def _quiet():
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()


def _save_clip(folder: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    c = TINY_BACKBONES["clip"]
    config = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=64,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=c["hidden"],
            intermediate_size=4 * c["hidden"],
            num_hidden_layers=c["layers"],
            num_attention_heads=c["heads"],
            image_size=224,
            patch_size=c["patch"],
            hidden_act="quick_gelu",
        ),
        projection_dim=c["projection"],
    )
    CLIPModel(config).save_pretrained(folder)  # the full model, text tower included, as the real folder has it
    CLIPImageProcessor().save_pretrained(folder)  # its defaults are openai/clip-vit-large-patch14's settings


def _save_dinov2(folder: Path) -> None:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    c = TINY_BACKBONES["dinov2"]
    config = Dinov2Config(
        hidden_size=c["hidden"],
        intermediate_size=4 * c["hidden"],
        num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"],
        patch_size=c["patch"],
        image_size=c["image_size"],
    )
    Dinov2Model(config).save_pretrained(folder)
    # facebook/dinov2-large's preprocessor_config.json: shortest edge 256 bicubic, crop 224, ImageNet statistics.
    BitImageProcessor(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        resample=3,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    ).save_pretrained(folder)


def _save_dinov3(folder: Path) -> None:
    from transformers import DINOv3ViTConfig, DINOv3ViTImageProcessor, DINOv3ViTModel

    c = TINY_BACKBONES["dinov3"]
    config = DINOv3ViTConfig(
        hidden_size=c["hidden"],
        intermediate_size=4 * c["hidden"],
        num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"],
        patch_size=c["patch"],
        num_register_tokens=c["registers"],
        layerscale_value=1.0,  # the release initialises at 1e-5; at random weights that would make the CLS constant
    )
    DINOv3ViTModel(config).save_pretrained(folder)
    DINOv3ViTImageProcessor().save_pretrained(folder)  # 224 x 224 bilinear, ImageNet statistics (the release's)


def _save_longclip(folder: Path) -> None:
    from open_clip.model import CLIP

    c = TINY_BACKBONES["longclip"]
    model = CLIP(
        embed_dim=c["embed_dim"],
        vision_cfg={"layers": c["layers"], "width": c["width"], "patch_size": c["patch"], "image_size": 224},
        text_cfg={"context_length": c["context"], "vocab_size": 64, "width": 64, "heads": 1, "layers": 1},
        quick_gelu=True,
    )
    # open_clip's CLIP uses the OpenAI key layout; a plain tensor dict is what LongCLIP's release pickles.
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, folder / "longclip-L.pt")


_SAVERS = {"clip": _save_clip, "dinov2": _save_dinov2, "dinov3": _save_dinov3, "longclip": _save_longclip}


def save_tiny_backbones(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the four tiny backbones under ``root`` (one folder each) and return name → folder.

    Every backbone is seeded separately (``seed + i``), so each one's weights do not depend on the others.
    """
    _quiet()
    root = Path(root)
    paths = {}
    for i, (name, save) in enumerate(_SAVERS.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + i)
            save(folder)
        paths[name] = folder
    return paths


def tiny_backbone_paths(seed: int = 0) -> dict[str, Path]:
    """Folders of the tiny backbones, written once per process into a temporary folder removed at exit — once per
    machine in a distributed run: transformers writes on rank 0 only, and every rank reads rank 0's."""
    from ..dist import current

    if seed not in _PATHS:
        runtime = current()

        def write() -> dict[str, Path]:
            root = Path(tempfile.mkdtemp(prefix="uae_fast_tiny_backbones_"))
            atexit.register(shutil.rmtree, root, ignore_errors=True)  # rank 0 exits last (the final barrier)
            return save_tiny_backbones(root, seed)

        _PATHS[seed] = runtime.on_main(write)
    return _PATHS[seed]
