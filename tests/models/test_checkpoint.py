"""Checkpoints: the released layout round-trips bit-exactly, LoRA adapters load (ours and the release's shards),
and missing pieces give errors that name the path."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

import uae_fast
from uae_fast.api import PRESETS
from uae_fast.errors import CheckpointError
from uae_fast.models.components import load_components, save_components
from uae_fast.presets.tiny import build_tiny

GEN = dict(steps=3, guidance=4.0, size=64, seed=[11, 12])
CAPTIONS = ["a red cat on a table", "a rocket under the sky"]


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_released_layout_and_safetensors_only(tiny_checkpoint):
    for sub in ("llm/config.json", "llm/model.safetensors", "llm/tokenizer.json", "dit/config.json"):
        assert (tiny_checkpoint / sub).is_file(), sub
    for sub in ("vae", "scheduler", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer_3"):
        assert (tiny_checkpoint / "SD3" / sub).is_dir(), sub
    files = [p.name for p in tiny_checkpoint.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert not (tiny_checkpoint / "llm_lora").exists() and not (tiny_checkpoint / "dit_lora").exists()
    assert not [p for p in tiny_checkpoint.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_round_trip_is_bit_exact(tiny, tiny_checkpoint, demo):
    loaded = uae_fast.load(tiny_checkpoint, device="cpu")
    for name in ("encoder", "transformer", "vae"):
        _state_equal(getattr(tiny.components, name), getattr(loaded.components, name))
    assert torch.equal(loaded.decoder.pooled_empty, tiny.decoder.pooled_empty)
    assert loaded.caption(demo[:2], num_generations=2, max_new_tokens=8) == tiny.caption(
        demo[:2], num_generations=2, max_new_tokens=8
    )
    assert torch.equal(loaded.generate_tensors(CAPTIONS, **GEN), tiny.generate_tensors(CAPTIONS, **GEN))


def test_text_mode_round_trip(tiny_checkpoint):
    ours = uae_fast.load(tiny_checkpoint, conditioning="text", device="cpu")
    ref = uae_fast.load("tiny", conditioning="text", device="cpu")
    assert torch.equal(ours.generate_tensors(CAPTIONS, **GEN), ref.generate_tensors(CAPTIONS, **GEN))


def test_llm_mode_drops_text_encoders_but_can_still_save(tiny_checkpoint, tmp_path):
    components = load_components(tiny_checkpoint)
    assert components.text_encoders is None and components.pooled_empty is not None
    save_components(components, tmp_path / "again")
    assert (tmp_path / "again" / "SD3" / "text_encoder_3" / "config.json").is_file()
    again = load_components(tmp_path / "again", conditioning="text")
    assert again.text_encoders.t5 is not None


def _randomise_lora(module: torch.nn.Module, seed: int) -> None:
    """PEFT initialises B to zero (a no-op adapter); fill both factors so the adapter changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _with_adapters():
    c = build_tiny()
    c.encoder.attach_lora(LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    _randomise_lora(c.encoder, 1)
    c.transformer = get_peft_model(c.transformer, LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"]))
    _randomise_lora(c.transformer, 2)
    return uae_fast.UAE(c, device="cpu", defaults=PRESETS["tiny"])


def test_lora_adapters_round_trip(tmp_path, demo, tiny):
    uae = _with_adapters()
    uae.save_pretrained(tmp_path / "ckpt")
    for sub in ("llm_lora", "dit_lora"):
        assert (tmp_path / "ckpt" / sub / "adapter_config.json").is_file()
        assert (tmp_path / "ckpt" / sub / "adapter_model.safetensors").is_file()
    # llm/ holds the base weights only: no PEFT names leak into the released encoder layout
    from safetensors import safe_open

    with safe_open(tmp_path / "ckpt" / "llm" / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "base_layer" in k]
    loaded = uae_fast.load(tmp_path / "ckpt", device="cpu")
    assert torch.equal(loaded.generate_tensors(CAPTIONS, **GEN), uae.generate_tensors(CAPTIONS, **GEN))
    assert loaded.caption(demo[:1], max_new_tokens=8) == uae.caption(demo[:1], max_new_tokens=8)
    # and the adapters matter (control): the base model renders something else
    assert not torch.equal(tiny.generate_tensors(CAPTIONS, **GEN), uae.generate_tensors(CAPTIONS, **GEN))


def test_final_save_takes_each_models_state_once(tmp_path, monkeypatch):
    """Under FSDP2 each state_dict() gathers the sharded weights: the adapter folder and the base folder of a model
    come from one call, and hold what PEFT's own state dicts hold (adapter names as PEFT's, base without adapters)."""
    uae = _with_adapters()
    expected_llm_lora = {k: v for k, v in uae.encoder.lora_model.state_dict().items() if "lora_" in k}
    expected_dit_lora = {k: v for k, v in uae.decoder.transformer.state_dict().items() if "lora_" in k}
    models = {id(m): name for name, m in (("encoder", uae.encoder), ("llm", uae.encoder.lora_model),
              ("dit", uae.decoder.transformer), ("dit base", uae.decoder.transformer.get_base_model()))}  # fmt: skip
    calls, state_dict = [], torch.nn.Module.state_dict

    def recording(self, *args, **kwargs):
        if not args and "prefix" not in kwargs and id(self) in models:  # a top-level call, not the recursion
            calls.append(models[id(self)])
        return state_dict(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "state_dict", recording)
    uae.save_pretrained(tmp_path / "ckpt")
    monkeypatch.undo()
    assert calls == ["encoder", "dit"]
    from safetensors.torch import load_file

    for sub, expected in (("llm_lora", expected_llm_lora), ("dit_lora", expected_dit_lora)):
        saved = load_file(tmp_path / "ckpt" / sub / "adapter_model.safetensors")
        assert len(saved) == len(expected) > 0
        assert sorted(torch.cat([v.flatten() for v in saved.values()]).tolist()) == sorted(
            torch.cat([v.flatten() for v in expected.values()]).tolist()
        )


def _write_release_shards(state: dict, folder, n: int = 3) -> None:
    """The authors' llm_lora/ format: the whole PEFT-wrapped encoder state dict in n shards."""
    folder.mkdir(parents=True)
    keys = sorted(state)
    for i in range(n):
        part = {k: state[k].contiguous() for k in keys[i::n]}
        save_file(part, str(folder / f"model-{i + 1:05d}-of-{n:05d}.safetensors"))


def _pre_452_name(key: str) -> str:
    """transformers < 4.52 naming: the LM was `model.` (the module PEFT wrapped), the vision tower `visual.`."""
    return key.replace("model.base_model.model.language_model.", "model.base_model.model.").replace(
        "model.base_model.model.visual.", "visual."
    )


@pytest.mark.parametrize("naming", ["current", "pre-4.52"])
def test_release_format_llm_lora_shards(tmp_path, tiny_checkpoint, naming):
    ref = build_tiny()
    targets = (
        "all-linear"
        if naming == "current"
        else r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    )
    ref.encoder.attach_lora(LoraConfig(r=32, lora_alpha=64, target_modules=targets))
    _randomise_lora(ref.encoder, 3)
    state = ref.encoder.state_dict()
    if naming == "pre-4.52":
        state = {_pre_452_name(k): v for k, v in state.items()}
        assert any(k.startswith("visual.") for k in state)
    ckpt = tmp_path / "release"
    import shutil

    shutil.copytree(tiny_checkpoint, ckpt)
    _write_release_shards(state, ckpt / "llm_lora")

    loaded = load_components(ckpt)
    _state_equal(loaded.encoder, ref.encoder)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encoder.project(ids, torch.ones_like(ids)), ref.encoder.project(ids, torch.ones_like(ids))
        )


def test_release_shards_with_foreign_keys_are_refused(tmp_path, tiny_checkpoint):
    import shutil

    ckpt = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, ckpt)
    state = {
        "model.base_model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight": torch.zeros(4, 64)
    }
    state["some.other.model.weight"] = torch.zeros(3)
    _write_release_shards(state, ckpt / "llm_lora", n=1)
    with pytest.raises(CheckpointError, match="match no encoder parameter"):
        load_components(ckpt)


@pytest.mark.parametrize(
    "remove, expected",
    [
        ("llm", "encoder"),
        ("SD3", "SD3 base pipeline folder"),
        ("SD3/vae", "SD3 VAE"),
        ("SD3/text_encoder_2", "SD3 text_encoder_2"),
    ],
)
def test_missing_components_name_the_path(tmp_path, tiny_checkpoint, remove, expected):
    import shutil

    ckpt = tmp_path / "partial"
    shutil.copytree(tiny_checkpoint, ckpt)
    shutil.rmtree(ckpt / remove)
    with pytest.raises(CheckpointError, match=expected) as err:
        uae_fast.load(ckpt, device="cpu")
    assert str(ckpt) in str(err.value) and "\n" not in str(err.value)


def test_missing_dit_falls_back_to_sd3_transformer_then_errors(tmp_path, tiny_checkpoint):
    import shutil

    ckpt = tmp_path / "nodit"
    shutil.copytree(tiny_checkpoint, ckpt)
    shutil.move(ckpt / "dit", ckpt / "SD3" / "transformer")
    assert isinstance(uae_fast.load(ckpt, device="cpu"), uae_fast.UAE)
    shutil.rmtree(ckpt / "SD3" / "transformer")
    with pytest.raises(CheckpointError, match="DiT weights"):
        uae_fast.load(ckpt, device="cpu")


def test_missing_folder_and_uae3b_without_env(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        uae_fast.load(tmp_path / "nope")
    monkeypatch.delenv("UAE_FAST_UAE3B", raising=False)
    with pytest.raises(CheckpointError, match="UAE_FAST_UAE3B"):
        uae_fast.load("uae-3b")


def test_plain_qwen_without_projector_is_refused(tmp_path, tiny_checkpoint):
    import shutil

    from safetensors.torch import load_file

    ckpt = tmp_path / "plain"
    shutil.copytree(tiny_checkpoint, ckpt)
    weights = load_file(ckpt / "llm" / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if not k.startswith("projector")},
        ckpt / "llm" / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(CheckpointError, match="no projector weights"):
        uae_fast.load(ckpt, device="cpu")


def test_format_file_records_version(tiny_checkpoint):
    meta = json.loads((tiny_checkpoint / "uae_fast.json").read_text())
    assert meta["format"] == "uae_fast" and meta["version"] == 1


# ------------------------------------------------------------------ inference defaults travel with the checkpoint
def _with_meta(tmp_path, tiny_checkpoint, edit):
    """A checkpoint sharing the tiny one's folders (symlinks) with an edited uae_fast.json."""
    folder = tmp_path / "edited"
    folder.mkdir()
    for sub in ("llm", "SD3", "dit"):
        (folder / sub).symlink_to(tiny_checkpoint / sub)
    meta = json.loads((tiny_checkpoint / "uae_fast.json").read_text())
    edit(meta)
    (folder / "uae_fast.json").write_text(json.dumps(meta))
    return folder


def test_inference_defaults_round_trip(tiny_checkpoint):
    """A model saved from the tiny preset renders with the tiny preset's sizes when loaded back."""
    meta = json.loads((tiny_checkpoint / "uae_fast.json").read_text())
    assert meta["inference_defaults"] == {
        "temperature": 0.7, "top_p": 1.0, "max_new_tokens": 24, "steps": 6, "guidance": 5.0, "size": 64
    }  # fmt: skip
    loaded = uae_fast.load(tiny_checkpoint, device="cpu")
    assert loaded.defaults == PRESETS["tiny"] != uae_fast.InferenceDefaults()
    assert loaded.generate_tensors(["a cat"], steps=1).shape[-2:] == (64, 64)  # size from the stored defaults


def test_checkpoint_without_inference_defaults_gets_the_official_ones(tmp_path, tiny_checkpoint):
    folder = _with_meta(tmp_path, tiny_checkpoint, lambda meta: meta.pop("inference_defaults"))
    assert uae_fast.load(folder, device="cpu").defaults == uae_fast.InferenceDefaults(
        temperature=0.7, top_p=1.0, max_new_tokens=512, steps=40, guidance=5.0, size=1024
    )
    # and a partial object keeps the official value of every key it leaves out
    folder = tmp_path / "partial"
    folder.mkdir()
    defaults = uae_fast.InferenceDefaults.from_json({"steps": 3}, folder / "uae_fast.json")
    assert defaults == uae_fast.InferenceDefaults(steps=3)


@pytest.mark.parametrize(
    "value, message",
    [
        ({"steps": "40"}, 'inference_defaults.steps is "40"; expected an integer >= 1'),
        ({"size": 0}, "inference_defaults.size is 0"),
        ({"max_new_tokens": 2.5}, "inference_defaults.max_new_tokens is 2.5"),
        ({"top_p": 1.5}, "inference_defaults.top_p is 1.5; expected a number in \\(0, 1\\]"),
        ({"temperature": True}, "inference_defaults.temperature is true"),
        ({"stpes": 4}, "unknown inference_defaults key 'stpes'"),
        ([1, 2], "inference_defaults must be a JSON object"),
    ],
)
def test_malformed_inference_defaults_are_one_line_errors(tmp_path, tiny_checkpoint, value, message):
    folder = _with_meta(tmp_path, tiny_checkpoint, lambda meta: meta.update(inference_defaults=value))
    with pytest.raises(CheckpointError, match=message) as err:
        uae_fast.load(folder, device="cpu")
    assert str(err.value).startswith(str(folder / "uae_fast.json")) and "\n" not in str(err.value)
