"""The four reward / Unified-Bench feature extractors, loaded from local folders only.

Each extractor maps float images [N, 3, H, W] in [0, 1] to one feature vector per image, with the preprocessing
and the feature its authors' evaluation (Unified-Bench) uses:

======== ==================================== ========================================= ===========================
name     checkpoint layout                    preprocessing                             feature
======== ==================================== ========================================= ===========================
clip     openai/clip-vit-large-patch14        CLIP processor: shortest edge 224 bicubic, ``get_image_features``
         (transformers folder)                centre crop 224, CLIP mean/std            (projected, 768-d)
dinov2   facebook/dinov2-large (transformers) BitImageProcessor: shortest 256, crop 224 CLS of last_hidden_state
dinov3   dinov3-vitl16-pretrain (transformers) DINOv3 processor: 224 x 224 bilinear     CLS of last_hidden_state
longclip longclip-L.pt (OpenAI state dict)    OpenAI transform: Resize 224 bicubic,     ``encode_image`` (image
                                              CenterCrop 224, CLIP mean/std             tower + proj, 768-d)
======== ==================================== ========================================= ===========================

Processor settings are read from the folder's ``preprocessor_config.json`` with transformers' AutoImageProcessor and
reproduced with torch ops (:class:`~uae_fast.rewards.preprocess.TensorPreprocess`). Nothing is downloaded
(``local_files_only``), no remote code runs, and the LongCLIP ``.pt`` is read with ``torch.load(weights_only=True)``,
which refuses pickled code.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from .config import BACKBONE_NAMES, DINO_FEATURE_NAMES
from .preprocess import TensorPreprocess

__all__ = [
    "BACKBONE_NAMES",
    "BACKBONE_LOADERS",
    "FeatureExtractor",
    "load_backbone",
    "load_backbones",
    "read_openai_state_dict",
]


class FeatureExtractor(nn.Module):
    """Preprocess + backbone + feature selection; frozen, always in eval mode, never builds a graph.

    Args:
        name: Backbone name (a key of :data:`BACKBONE_LOADERS`).
        model: The loaded module.
        preprocess: Resize / crop / normalise equal to the backbone's official processor.
        encode: ``encode(model, pixel_values [N, 3, h, w]) -> features [N, D]``.
        dim: Feature width D.
        source: Where the weights came from (shown in reports).
    """

    def __init__(
        self, name: str, model: nn.Module, preprocess: TensorPreprocess, encode: Callable, dim: int, source=""
    ):
        super().__init__()
        self.name, self.model, self.preprocess, self.encode_fn = name, model.eval(), preprocess, encode
        self.model.requires_grad_(False)
        self.dim, self.source = int(dim), str(source)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def forward(self, images, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Features of images.

        Args:
            images: Float [N, 3, H, W] in [0, 1] (or a list of [3, H_i, W_i]) on the extractor's device.
            pixel_values: Already preprocessed input [N, 3, h, w] (skips the preprocessing when given).

        Returns:
            [N, D] features in the model's dtype (not normalised).
        """
        if pixel_values is None:
            pixel_values = self.preprocess(images)
        return self.encode_fn(self.model, pixel_values.to(self.device, self.dtype))

    def features_with_grad(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Features [N, D] of images [N, 3, H, W] in [0, 1] (or a list of [3, H_i, W_i]) under autograd: the
        weights stay frozen, the gradient reaches the images (:meth:`TensorPreprocess.differentiable`). float32, or
        float64 for a float64 model."""
        if isinstance(images, torch.Tensor):
            pixel_values = self.preprocess.differentiable(images)
        else:
            pixel_values = torch.cat([self.preprocess.differentiable(im.unsqueeze(0)) for im in images])
        features = self.encode_fn(self.model, pixel_values.to(self.device, self.dtype))
        return features.to(torch.promote_types(features.dtype, torch.float32))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, source={self.source!r}"


# ------------------------------------------------------------------ transformers backbones
def _require_dir(name: str, path: str | os.PathLike, layout: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise CheckpointError(
            f"{name} backbone: {folder} {what}; expected a local folder in the {layout} layout "
            "(nothing is downloaded; pass --backbones tiny for the random test backbones)"
        )
    for required in ("config.json", "preprocessor_config.json"):
        if not (folder / required).is_file():
            raise CheckpointError(f"{name} backbone: {folder / required} is missing ({layout} layout)")
    return folder


def _hf_load(name: str, folder: Path, load: Callable):
    try:
        return load()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{name} backbone: cannot load {folder} ({type(exc).__name__}: {exc})") from None


def _processor(name: str, folder: Path) -> TensorPreprocess:
    from transformers import AutoImageProcessor

    proc = _hf_load(name, folder, lambda: AutoImageProcessor.from_pretrained(folder, local_files_only=True))
    return TensorPreprocess.from_image_processor(proc)


def _cls_token(model, pixel_values):
    return model(pixel_values=pixel_values).last_hidden_state[:, 0]


def mean_patch_token(model, pixel_values):
    """Mean of a DINO model's patch tokens (CLS and register tokens excluded): a more spatial feature than the
    CLS token, used where the CLS token barely varies (random tiny backbones)."""
    skip = 1 + getattr(model.config, "num_register_tokens", 0)
    return model(pixel_values=pixel_values).last_hidden_state[:, skip:].mean(1)


DINO_FEATURES = {"cls": _cls_token, "mean_patch": mean_patch_token}
assert tuple(DINO_FEATURES) == DINO_FEATURE_NAMES  # the config validates names without importing torch


def load_clip(path, device=None, dtype=None) -> FeatureExtractor:
    """CLIP ViT-L/14 image tower + visual projection (= ``CLIPModel.get_image_features``), text tower not loaded."""
    from transformers import CLIPConfig, CLIPVisionModelWithProjection

    folder = _require_dir("clip", path, "openai/clip-vit-large-patch14")
    config = _hf_load("clip", folder, lambda: CLIPConfig.from_pretrained(folder, local_files_only=True))
    vision = config.vision_config
    vision.projection_dim = config.projection_dim  # a CLIPModel config keeps it at the top level only
    model = _hf_load(
        "clip",
        folder,
        lambda: CLIPVisionModelWithProjection.from_pretrained(
            folder, config=vision, local_files_only=True, dtype=dtype or torch.float32
        ),
    )
    return FeatureExtractor(
        "clip",
        model.to(device),
        _processor("clip", folder),
        lambda m, px: m(pixel_values=px).image_embeds,
        config.projection_dim,
        folder,
    )


def _load_dino(name: str, layout: str, path, device, dtype) -> FeatureExtractor:
    from transformers import AutoModel

    folder = _require_dir(name, path, layout)
    model = _hf_load(
        name,
        folder,
        lambda: AutoModel.from_pretrained(
            folder, local_files_only=True, dtype=dtype or torch.float32, trust_remote_code=False
        ),
    )
    return FeatureExtractor(
        name, model.to(device), _processor(name, folder), _cls_token, model.config.hidden_size, folder
    )


def load_dinov2(path, device=None, dtype=None) -> FeatureExtractor:
    """DINOv2 (facebook/dinov2-large layout); feature = CLS token of ``last_hidden_state`` (after the final norm)."""
    return _load_dino("dinov2", "facebook/dinov2-large", path, device, dtype)


def load_dinov3(path, device=None, dtype=None) -> FeatureExtractor:
    """DINOv3 ViT-L/16 (dinov3-vitl16-pretrain-lvd1689m layout); feature = CLS token of ``last_hidden_state``."""
    return _load_dino("dinov3", "facebook/dinov3-vitl16-pretrain-lvd1689m", path, device, dtype)


# ------------------------------------------------------------------ LongCLIP (OpenAI-format state dict, open_clip)
def _longclip_file(path) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        candidates = sorted(q for q in p.iterdir() if q.suffix in (".pt", ".pth", ".safetensors") and q.is_file())
        if len(candidates) != 1:
            found = ", ".join(q.name for q in candidates) or "none"
            raise CheckpointError(
                f"longclip backbone: {p} must hold exactly one .pt/.safetensors checkpoint (found: {found})"
            )
        p = candidates[0]
    if not p.is_file():
        raise CheckpointError(
            f"longclip backbone: {p} does not exist; expected the OpenAI-format longclip-L.pt (or a folder holding it)"
        )
    return p


def read_openai_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of an OpenAI-format CLIP checkpoint, without executing pickled code."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an UnpicklingError for TorchScript archives or pickles with custom classes
        raise CheckpointError(
            f"longclip backbone: {path} is not a plain state dict loadable with weights_only=True "
            f"({type(exc).__name__}); convert it to a state dict or safetensors on a trusted machine"
        ) from None
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or "visual.proj" not in state:
        raise CheckpointError(
            f"longclip backbone: {path} has no 'visual.proj': not an OpenAI-format ViT CLIP checkpoint"
        )
    return dict(state)


def load_longclip(path, device=None, dtype=None) -> FeatureExtractor:
    """LongCLIP-L image tower built with open_clip from the OpenAI-format checkpoint (QuickGELU, as trained)."""
    from open_clip.transformer import QuickGELU, VisionTransformer

    file = _longclip_file(path)
    state = read_openai_state_dict(file)
    visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    # Geometry from tensor shapes, as open_clip's build_model_from_openai_state_dict infers it.
    width, patch = visual["conv1.weight"].shape[0], visual["conv1.weight"].shape[-1]
    layers = sum(1 for k in visual if k.endswith(".attn.in_proj_weight"))
    grid = round((visual["positional_embedding"].shape[0] - 1) ** 0.5)
    model = VisionTransformer(
        image_size=patch * grid,
        patch_size=patch,
        width=width,
        layers=layers,
        heads=max(1, width // 64),  # OpenAI ViTs use 64-wide heads (ViT-L/14: 1024 / 64 = 16)
        mlp_ratio=4.0,
        output_dim=visual["proj"].shape[1],
        act_layer=QuickGELU,
    )
    try:
        model.load_state_dict(visual, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"longclip backbone: {file} does not fit a ViT image tower ({exc})") from None
    model = model.to(device=device, dtype=dtype or torch.float32)  # OpenAI checkpoints may store fp16 weights
    return FeatureExtractor(
        "longclip", model, TensorPreprocess.openai_clip(patch * grid), lambda m, px: m(px), model.output_dim, file
    )


BACKBONE_LOADERS: dict[str, Callable[..., FeatureExtractor]] = {
    "clip": load_clip,
    "dinov2": load_dinov2,
    "dinov3": load_dinov3,
    "longclip": load_longclip,
}


def load_backbone(name: str, path, *, device=None, dtype=None) -> FeatureExtractor:
    """Load one backbone by name from a local path (``"tiny"`` = the random-weight test backbone)."""
    if name not in BACKBONE_LOADERS:
        raise ConfigError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONE_LOADERS)}")
    if str(path) == "tiny":
        from .tiny import tiny_backbone_paths

        path = tiny_backbone_paths()[name]
    return BACKBONE_LOADERS[name](path, device=device, dtype=dtype)


def load_backbones(paths: Mapping[str, str | os.PathLike], *, device=None, dtype=None) -> dict[str, FeatureExtractor]:
    """Load several backbones: ``{"clip": "/models/clip-vit-large-patch14", "dinov2": "tiny", ...}``.

    All paths are checked before any weights are read, so a typo in the last one fails fast.
    """
    for name, path in paths.items():
        if name not in BACKBONE_LOADERS:
            raise ConfigError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONE_LOADERS)}")
        if str(path) != "tiny" and not Path(path).expanduser().exists():
            raise CheckpointError(f"{name} backbone: {path} does not exist (nothing is downloaded)")
    return {name: load_backbone(name, path, device=device, dtype=dtype) for name, path in paths.items()}
