"""UAE components and the released checkpoint layout: save and load.

Layout (the authors' release and our checkpoints alike; safetensors only, all local paths):

    llm/        Qwen2.5-VL + projector (`projector.0.*`, `projector.2.*`), plus the processor files
    llm_lora/   LoRA of the encoder: a PEFT adapter folder (ours), or the release's full-state-dict shards
    SD3/        the base SD3.5 pipeline folder: vae/, scheduler/, text_encoder{,_2,_3}/, tokenizer{,_2,_3}/
    dit/        full DiT weights (falls back to SD3/transformer/ when absent)
    dit_lora/   PEFT LoRA of the DiT
    llm_processor/  (release only) processor files when llm/ has none

Nothing here downloads: a missing folder is a `CheckpointError` that names the path it expected.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..io import atomic_dir
from .decoder import TextEncoders, clip_pooled_embeds
from .lora import load_dit_lora, save_lora, split_adapter_state

__all__ = [
    "InferenceDefaults",
    "UAEComponents",
    "save_components",
    "load_components",
    "default_device",
    "default_dtype",
    "FORMAT_FILE",
]

FORMAT_FILE = "uae_fast.json"  # our metadata next to the released layout
_DIT_WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' file name, so SD3Transformer2DModel loads it
_TEXT_ENCODER_FOLDERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


@dataclass
class InferenceDefaults:
    """Sampling defaults of a model; every `UAE` method argument left as None falls back to these.

    Saved with a checkpoint (`uae_fast.json`, key `inference_defaults`) and restored by `uae_fast.load`, so a model
    trained from the tiny preset keeps the tiny preset's sizes. These values are the official UAE recipe.
    """

    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 512
    steps: int = 40
    guidance: float = 5.0
    size: int = 1024

    @classmethod
    def from_json(cls, value, where: Path) -> InferenceDefaults:
        """Parse the `inference_defaults` object read from `where` (missing keys keep the official values).

        Raises:
            CheckpointError: not an object, an unknown key, or a value of the wrong type or range; names the file.
        """
        if not isinstance(value, dict):
            raise CheckpointError(f"{where}: inference_defaults must be a JSON object, got {json.dumps(value)}")
        parsed = {}
        for key, v in value.items():
            if key not in _RULES:
                raise CheckpointError(f"{where}: unknown inference_defaults key {key!r} (known: {', '.join(_RULES)})")
            kind, low, high, what = _RULES[key]
            number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not number or (kind is int and not isinstance(v, int)) or not (v >= low and v <= high):
                raise CheckpointError(f"{where}: inference_defaults.{key} is {json.dumps(v)}; expected {what}")
            parsed[key] = kind(v)
        return cls(**parsed)

    def to_json(self) -> dict:
        return asdict(self)


# key: (type, lowest, highest, description) of the stored inference defaults
_RULES = {
    "temperature": (float, 0.0, math.inf, "a number >= 0"),
    "top_p": (float, 1e-9, 1.0, "a number in (0, 1]"),
    "max_new_tokens": (int, 1, math.inf, "an integer >= 1"),
    "steps": (int, 1, math.inf, "an integer >= 1"),
    "guidance": (float, 0.0, math.inf, "a number >= 0"),
    "size": (int, 1, math.inf, "an integer >= 1"),
}


@dataclass
class UAEComponents:
    """Every module of a UAE, before being wired into an encoder/decoder pair."""

    encoder: torch.nn.Module  # UAEEncoder (its `.model` may be PEFT-wrapped)
    processor: object  # Qwen2_5_VLProcessor
    transformer: torch.nn.Module  # SD3Transformer2DModel (may be a PeftModel)
    vae: torch.nn.Module
    scheduler: object
    text_encoders: TextEncoders | None  # None once only the pooled "" embedding is kept (llm mode)
    pooled_empty: torch.Tensor | None = None  # [1, P]
    source: Path | None = None  # checkpoint folder these came from: SD3/ text encoders are copied from it on save
    max_sequence_length: int = 256  # T5 tokens in text mode
    # llm mode: pooled = pooled("") + w * masked mean of the caption's prompt embeddings. 0 (the official recipe)
    # for real checkpoints; the tiny preset sets it so that captions visibly steer its random decoder.
    caption_pooled_weight: float = 0.0
    inference_defaults: InferenceDefaults | None = None  # from uae_fast.json; None: not stored (official values)

    def to(self, device, dtype) -> UAEComponents:
        modules = [self.encoder, self.transformer, self.vae]
        if self.text_encoders is not None:
            enc = self.text_encoders
            modules += [m for m in (enc.clip_l, enc.clip_g, enc.t5) if m is not None]
        for module in modules:
            first = next(module.parameters())
            if first.device != torch.device(device) or first.dtype != dtype:  # no-op casts still warn in diffusers
                module.to(device=device, dtype=dtype)
        if self.pooled_empty is not None:
            self.pooled_empty = self.pooled_empty.to(device=device, dtype=dtype)
        return self

    def compute_pooled_empty(self) -> torch.Tensor:
        """SD3's pooled embedding of "" — the constant `pooled_prompt_embeds` of UAE's llm conditioning."""
        if self.pooled_empty is None:
            self.pooled_empty = clip_pooled_embeds(self.text_encoders, [""])
        return self.pooled_empty


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (as the release runs), fp32 on CPUs (bf16 CPU kernels are not all exact or fast)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def save_components(
    components: UAEComponents,
    out_dir: str | Path,
    *,
    inference_defaults: InferenceDefaults | None = None,
    write: bool = True,
) -> Path:
    """Write `components` in the released layout, atomically (a temp folder renamed into place).

    `inference_defaults` (default: `components.inference_defaults`) go into `uae_fast.json` when given. The
    trained models' state dicts are taken first, by every rank of a distributed run (gathering sharded weights is
    a collective); only the rank with `write` writes.
    """
    out_dir = Path(out_dir)
    defaults = inference_defaults or components.inference_defaults
    encoder, transformer = components.encoder, components.transformer
    # one state_dict() per model for both its folders (under FSDP2 each call gathers the sharded weights)
    encoder_lora, encoder_state = split_adapter_state(encoder, encoder.lora_model)
    dit_lora, dit_state = split_adapter_state(transformer)
    encoder_lora = encoder_lora if encoder.lora_model is not None else None
    dit_lora = dit_lora if _is_peft(transformer) else None
    dit_base = transformer.get_base_model() if _is_peft(transformer) else transformer
    if not write:
        return out_dir
    with atomic_dir(out_dir) as tmp:
        if encoder_lora is not None:
            save_lora(encoder.lora_model, tmp / "llm_lora", state_dict=encoder_lora)
        encoder.save_pretrained(tmp / "llm", state_dict=encoder_state)
        components.processor.save_pretrained(tmp / "llm")

        if dit_lora is not None:
            save_lora(transformer, tmp / "dit_lora", state_dict=dit_lora)
        dit_base.save_config(tmp / "dit")
        save_file(dit_state, tmp / "dit" / _DIT_WEIGHTS, metadata={"format": "pt"})

        sd3 = tmp / "SD3"
        components.vae.save_pretrained(sd3 / "vae", safe_serialization=True)
        components.scheduler.save_pretrained(sd3 / "scheduler")
        max_sequence_length = _save_text_encoders(components, sd3)
        meta = {
            "format": "uae_fast",
            "version": 1,
            "t5_max_sequence_length": max_sequence_length,
            "caption_pooled_weight": components.caption_pooled_weight,
        }
        if defaults is not None:
            meta["inference_defaults"] = defaults.to_json()
        (tmp / FORMAT_FILE).write_text(json.dumps(meta, indent=2))
    return out_dir


def _save_text_encoders(components: UAEComponents, sd3: Path) -> int:
    """Save SD3's text encoders, or copy them from the source checkpoint when they were dropped at load."""
    enc = components.text_encoders
    if enc is None:
        source = components.source / "SD3" if components.source is not None else None
        if source is None:
            raise CheckpointError("cannot write SD3/: its text encoders were dropped at load and the source is unknown")
        for sub in _TEXT_ENCODER_FOLDERS:
            if (source / sub).exists():
                shutil.copytree(source / sub, sd3 / sub)
        return components.max_sequence_length
    models = (enc.clip_l, enc.clip_g, enc.t5, enc.tokenizer_l, enc.tokenizer_g, enc.tokenizer_t5)
    for sub, obj in zip(_TEXT_ENCODER_FOLDERS, models):
        if obj is not None:
            obj.save_pretrained(sd3 / sub)
    return enc.max_sequence_length


def _read_meta(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return meta


def _is_peft(module: torch.nn.Module) -> bool:
    return hasattr(module, "peft_config") and hasattr(module, "get_base_model")


def _aligned(module: torch.nn.Module) -> torch.nn.Module:
    """Give every tensor of a freshly loaded CPU module 64-byte-aligned storage.

    Weights loaded from safetensors can be views at arbitrary offsets of one buffer; CPU GEMM libraries then take a
    different (slower) kernel whose rounding differs from the one a freshly built model gets, so a save/load round
    trip would not reproduce outputs bit for bit.
    """
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.device.type == "cpu" and tensor.data_ptr() % 64:
            tensor.data = tensor.data.clone()
    return module


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise CheckpointError(f"missing {what}: expected {path}")
    return path


def _load_processor(root: Path):
    from transformers import AutoProcessor

    for folder in (root / "llm", root / "llm_processor"):
        if (folder / "preprocessor_config.json").exists() or (folder / "processor_config.json").exists():
            processor = AutoProcessor.from_pretrained(folder)
            processor.tokenizer.padding_side = "left"  # batched generation continues each prompt at its end
            return processor
    raise CheckpointError(f"missing Qwen2.5-VL processor files: expected {root / 'llm'} or {root / 'llm_processor'}")


def _load_encoder(root: Path):
    from .encoder import UAEEncoder, attention_implementation

    llm = _require(root / "llm" / "config.json", "encoder (Qwen2.5-VL + projector)").parent
    encoder, info = UAEEncoder.from_pretrained(
        llm, output_loading_info=True, dtype=torch.float32, attn_implementation=attention_implementation()
    )
    _aligned(encoder)
    missing = [k for k in info["missing_keys"] if k.startswith("projector")]
    if missing:
        raise CheckpointError(f"{llm} has no projector weights ({', '.join(sorted(missing))}): not a UAE encoder")
    lora = root / "llm_lora"
    if lora.exists():
        encoder.load_lora(lora)
        _aligned(encoder)
    return encoder.eval()


def _load_text_encoders(sd3: Path, with_t5: bool, max_sequence_length: int) -> TextEncoders:
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    def model(cls, sub):
        return _aligned(cls.from_pretrained(_require(sd3 / sub, f"SD3 {sub}"), dtype=torch.float32).eval())

    def tokenizer(sub):
        return AutoTokenizer.from_pretrained(_require(sd3 / sub, f"SD3 {sub}"))

    return TextEncoders(
        clip_l=model(CLIPTextModelWithProjection, "text_encoder"),
        clip_g=model(CLIPTextModelWithProjection, "text_encoder_2"),
        t5=model(T5EncoderModel, "text_encoder_3") if with_t5 else None,
        tokenizer_l=tokenizer("tokenizer"),
        tokenizer_g=tokenizer("tokenizer_2"),
        tokenizer_t5=tokenizer("tokenizer_3") if with_t5 else None,
        max_sequence_length=max_sequence_length,
    )


def load_components(root: str | Path, *, conditioning: str = "llm") -> UAEComponents:
    """Load a checkpoint folder in the released layout (fp32, CPU; move with `.to`).

    In `llm` conditioning only CLIP-L/G are loaded from SD3/, to compute the pooled embedding of "" once, and are
    then dropped; T5 is loaded only in `text` mode.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {root}")
    sd3 = _require(root / "SD3", "SD3 base pipeline folder")
    meta_path = root / FORMAT_FILE
    meta = _read_meta(meta_path)
    defaults = meta.get("inference_defaults")
    defaults = None if defaults is None else InferenceDefaults.from_json(defaults, meta_path)

    encoder = _load_encoder(root)
    processor = _load_processor(root)
    dit = (
        root / "dit"
        if (root / "dit").exists()
        else _require(sd3 / "transformer", "DiT weights (dit/ or SD3/transformer/)")
    )
    transformer = _aligned(SD3Transformer2DModel.from_pretrained(dit, dtype=torch.float32).eval())
    if (root / "dit_lora").exists():
        transformer = _aligned(load_dit_lora(transformer, root / "dit_lora").eval())
    vae = _aligned(AutoencoderKL.from_pretrained(_require(sd3 / "vae", "SD3 VAE"), dtype=torch.float32).eval())
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(_require(sd3 / "scheduler", "SD3 scheduler"))
    max_len = meta.get("t5_max_sequence_length", 256)
    text_encoders = _load_text_encoders(sd3, with_t5=conditioning == "text", max_sequence_length=max_len)
    components = UAEComponents(
        encoder,
        processor,
        transformer,
        vae,
        scheduler,
        text_encoders,
        source=root,
        max_sequence_length=max_len,
        caption_pooled_weight=float(meta.get("caption_pooled_weight", 0.0)),
        inference_defaults=defaults,
    )
    if conditioning == "llm":
        components.compute_pooled_empty()
        components.text_encoders = None  # only the pooled "" embedding is needed from here on
    return components
