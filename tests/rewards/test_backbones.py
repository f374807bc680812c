"""Backbone loaders: tiny checkpoints round-trip through the real loading code; features equal the official
pipelines (processor on PIL + the authors' feature call); bad paths and unsafe checkpoints give clear errors."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F

from uae_fast.errors import CheckpointError, ConfigError
from uae_fast.rewards import BACKBONE_NAMES, as_image_batch, load_backbone, load_backbones, tiny_backbone_paths
from uae_fast.rewards.backbones import read_openai_state_dict


@pytest.fixture(scope="module")
def paths():
    return tiny_backbone_paths()


@pytest.fixture(scope="module")
def extractors(paths):
    return load_backbones({n: paths[n] for n in BACKBONE_NAMES}, device="cpu")


def _official_features(name, folder, images):
    """What the authors' Unified-Bench scorer computes: official processor on PIL, then the model's feature."""
    from transformers import AutoImageProcessor, AutoModel, CLIPModel

    if name == "longclip":
        import open_clip.model as oc
        import torchvision.transforms as T

        state = torch.load(folder / "longclip-L.pt", map_location="cpu", weights_only=True)
        model = oc.build_model_from_openai_state_dict(dict(state), cast_dtype=None).float().eval()
        tf = T.Compose(
            [
                T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(224),
                T.ToTensor(),
                T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
            ]
        )
        with torch.no_grad():
            return model.encode_image(torch.stack([tf(im) for im in images]))
    proc = AutoImageProcessor.from_pretrained(folder)
    px = proc(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        if name == "clip":
            out = CLIPModel.from_pretrained(folder).eval().get_image_features(pixel_values=px)
            return out if torch.is_tensor(out) else out.pooler_output
        return AutoModel.from_pretrained(folder).eval()(pixel_values=px).last_hidden_state[:, 0]


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_features_match_official_pipeline(name, paths, extractors, demo):
    ours = extractors[name](as_image_batch(demo))
    want = _official_features(name, paths[name], demo)
    assert ours.shape == want.shape == (len(demo), extractors[name].dim)
    # Same weights, preprocessing equal within 2/255 per pixel: features agree to cosine ~1.
    cos = F.cosine_similarity(ours, want)
    assert cos.min() > 0.9995, cos


def test_tiny_backbones_are_deterministic_and_seeded(tmp_path):
    from safetensors.torch import load_file

    from uae_fast.rewards import save_tiny_backbones

    a = save_tiny_backbones(tmp_path / "a", seed=0)
    b = save_tiny_backbones(tmp_path / "b", seed=0)
    c = save_tiny_backbones(tmp_path / "c", seed=1)
    wa, wb, wc = (load_file(str(p["dinov2"] / "model.safetensors")) for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    la, lb = (read_openai_state_dict(p["longclip"] / "longclip-L.pt") for p in (a, b))
    assert all(torch.equal(la[k], lb[k]) for k in la)


def test_clip_loads_only_the_image_tower(extractors):
    model = extractors["clip"].model
    assert type(model).__name__ == "CLIPVisionModelWithProjection"
    assert not any("text" in k for k in model.state_dict())


def test_longclip_checkpoint_matches_release_layout(paths):
    state = read_openai_state_dict(paths["longclip"] / "longclip-L.pt")
    assert state["positional_embedding"].shape[0] == 248  # LongCLIP's stretched text context
    assert {"visual.proj", "visual.conv1.weight", "text_projection", "token_embedding.weight"} <= set(state)


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_missing_path_names_it(name, tmp_path):
    missing = tmp_path / "nowhere" / name
    with pytest.raises(CheckpointError, match=str(missing)):
        load_backbone(name, missing)
    with pytest.raises(CheckpointError, match=str(missing)):
        load_backbones({name: missing})


@pytest.mark.parametrize("name", ["clip", "dinov2", "dinov3"])
def test_folder_without_processor_config_is_rejected(name, paths, tmp_path):
    import shutil

    broken = tmp_path / name
    shutil.copytree(paths[name], broken)
    (broken / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        load_backbone(name, broken)


def test_longclip_folder_must_hold_one_checkpoint(paths, tmp_path):
    with pytest.raises(CheckpointError, match="found: none"):
        load_backbone("longclip", tmp_path)
    for n in ("a.pt", "b.pt"):
        (tmp_path / n).write_bytes((paths["longclip"] / "longclip-L.pt").read_bytes())
    with pytest.raises(CheckpointError, match="a.pt, b.pt"):
        load_backbone("longclip", tmp_path)


class _Payload:
    """Unpickling this would run code (create a marker file); weights_only=True must refuse it."""

    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_longclip_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    _Payload.marker = marker
    bad = tmp_path / "longclip-L.pt"
    with open(bad, "wb") as f:
        pickle.dump({"visual.proj": torch.zeros(2, 2), "x": _Payload()}, f)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_backbone("longclip", bad)
    assert not marker.exists()


def test_longclip_state_dict_without_vision_tower_is_rejected(tmp_path):
    torch.save({"token_embedding.weight": torch.zeros(4, 4)}, tmp_path / "text_only.pt")
    with pytest.raises(CheckpointError, match="visual.proj"):
        load_backbone("longclip", tmp_path / "text_only.pt")


def test_unknown_backbone_name():
    with pytest.raises(ConfigError, match="unknown backbone 'siglip'"):
        load_backbones({"siglip": "tiny"})
