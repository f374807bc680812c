"""LoRA adapters in the released layout.

Our checkpoints store adapters as PEFT adapter folders (`adapter_config.json` + `adapter_model.safetensors`). The
authors' `llm_lora/` is different: the encoder's inner model wrapped with `get_peft_model(r=32, alpha=64,
target_modules="all-linear")` and its *whole* state dict saved as `model-0000i-of-0000n.safetensors` shards, which
their demo loads with `load_state_dict(strict=False)`. We reproduce that wrapping and load the same keys, but match
them explicitly (tolerating the pre-4.52 transformers key names) so a wrong file is an error, not a silent no-op.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import CheckpointError

__all__ = [
    "save_lora",
    "load_encoder_lora",
    "load_dit_lora",
    "load_release_lora",
    "split_adapter_state",
    "RELEASE_LORA_RANK",
    "RELEASE_LORA_ALPHA",
]

RELEASE_LORA_RANK = 32
RELEASE_LORA_ALPHA = 64


def save_lora(peft_model, path: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write a PEFT adapter folder (safetensors); `state_dict`: the model's tensors to take it from (default: its
    own state dict)."""
    peft_model.save_pretrained(str(path), safe_serialization=True, state_dict=state_dict)


def split_adapter_state(
    module: torch.nn.Module, adapter: torch.nn.Module | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(adapter tensors, base weights) from **one** `module.state_dict()`: under FSDP2 every call gathers all
    sharded weights, so the final save takes the state once for both folders.

    The adapter tensors (`lora_*`, trained `modules_to_save` copies) are named as `adapter.state_dict()` names them
    — `adapter` is the PEFT model inside `module` (or `module` itself, the default) — which is what PEFT's
    `save_pretrained(state_dict=...)` takes. The base weights are the module's without its adapters, under the
    names the un-adapted model has: PEFT injects adapters in place (`q_proj` becomes a wrapper holding `base_layer`
    and `lora_A/B`; a trained `modules_to_save` layer holds `original_module` and its trained copy), so even the
    "base model" of a PeftModel carries them, and the released `llm/` and `dit/` folders must not.
    """
    prefix = ""
    if adapter is not None and adapter is not module:
        prefix = next((name + "." for name, m in module.named_modules() if m is adapter), None)
        if prefix is None:
            raise ValueError("the adapter is not a submodule of the module")
    lora, base = {}, {}
    for key, tensor in module.state_dict().items():
        if "lora_" in key or ".modules_to_save." in key:
            if key.startswith(prefix):
                lora[key[len(prefix) :]] = tensor
            continue
        key = key.replace("base_model.model.", "").replace(".base_layer", "").replace(".original_module", "")
        base[key] = tensor
    return lora, base


def _canonical(key: str) -> str:
    """One name per parameter across PEFT wrapping and transformers' 4.52 module rename."""
    key = key.replace("base_model.model.", "")
    key = key.replace("language_model.", "")
    if key.startswith("visual."):
        key = "model." + key
    return key


def _read_release_shards(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{path} holds neither adapter_config.json (PEFT adapter) nor *.safetensors shards")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(shard))
    return state


def _release_targets(state: dict[str, torch.Tensor], inner_model, path: Path) -> list[str]:
    """Module names of `encoder.model` that carry LoRA in the release shards (all-linear: LM and, since
    transformers 4.52, the vision tower too; older saves wrapped the LM only)."""
    wanted = {_canonical(k.split(".lora_A")[0]) for k in state if ".lora_A" in k}
    if not wanted:
        raise CheckpointError(f"{path}: the safetensors shards contain no LoRA weights (no '.lora_A' keys)")
    ours = {_canonical("model." + n): n for n, m in inner_model.named_modules() if isinstance(m, torch.nn.Linear)}
    unknown = sorted(wanted - ours.keys())
    if unknown:
        raise CheckpointError(f"{path}: LoRA on {len(unknown)} layers the encoder does not have (first: {unknown[0]})")
    return sorted(ours[w] for w in wanted)


def _release_rank(state: dict[str, torch.Tensor], path: Path) -> int:
    ranks = {t.shape[0] for k, t in state.items() if re.search(r"lora_A(\.\w+)?\.weight$", k)}
    if len(ranks) != 1:
        raise CheckpointError(f"{path}: expected LoRA A matrices of one rank, found ranks {sorted(ranks)}")
    return ranks.pop()


def load_release_lora(encoder, path: Path) -> None:
    """Attach the release's `llm_lora/` shards (the whole PEFT-wrapped state dict) to a bare `UAEEncoder`."""
    from peft import LoraConfig

    state = _read_release_shards(path)
    targets = _release_targets(state, encoder.model, path)
    rank = _release_rank(state, path)
    alpha = RELEASE_LORA_ALPHA * rank // RELEASE_LORA_RANK  # the release's alpha/r = 2
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian")
    encoder.attach_lora(config)
    ours = {_canonical(k): k for k in encoder.state_dict()}
    unmatched = [k for k in state if _canonical(k) not in ours]
    if unmatched:
        raise CheckpointError(f"{path}: {len(unmatched)} weights match no encoder parameter (first: {unmatched[0]})")
    matched = {ours[_canonical(k)]: v for k, v in state.items()}
    lora_missing = sorted(k for k in encoder.state_dict() if "lora_" in k and k not in matched)
    if lora_missing:
        raise CheckpointError(f"{path}: {len(lora_missing)} LoRA weights missing (first: {lora_missing[0]})")
    # Like the authors' demo, every weight in the shards is loaded (base, projector and LoRA alike).
    encoder.load_state_dict(matched, strict=False)


def load_encoder_lora(encoder, path: Path) -> None:
    """Attach the encoder LoRA at `path` (PEFT adapter folder or release shards): `encoder.load_lora(path)`."""
    encoder.load_lora(Path(path))


def load_dit_lora(transformer, path: Path):
    """The DiT wrapped with the PEFT adapter at `path` (a checkpoint's `dit_lora/`), checked to fit: an adapter for
    other modules or widths is a one-line CheckpointError, not a deep traceback or a silently partial load."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    from ..data.images import one_line

    path = Path(path)
    if not (path / "adapter_config.json").exists():
        raise CheckpointError(f"{path} is not a PEFT adapter folder (no adapter_config.json)")
    try:
        model = PeftModel.from_pretrained(transformer, str(path))
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} does not fit this DiT: {one_line(exc)}") from None
    loaded = set(get_peft_model_state_dict(model))
    stray = sorted(set(load_peft_weights(str(path), device="cpu")) - loaded)
    if stray:
        raise CheckpointError(f"{path} does not fit this DiT: {len(stray)} weights match no layer (first: {stray[0]})")
    return model
