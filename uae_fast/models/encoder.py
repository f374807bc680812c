"""The UAE encoder: Qwen2.5-VL (image → caption) plus the projector that turns its hidden states into SD3 conditioning.

The class keeps the released checkpoint's layout: a plain `Qwen2_5_VLForConditionalGeneration` whose state dict also
holds `projector.0.*` and `projector.2.*`, so `from_pretrained` on the released `llm/` folder and on our own saves is
the same code path.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration

__all__ = [
    "CAPTION_PROMPT",
    "NEGATIVE_PROMPT",
    "GENERATE_ROLE",
    "UAEEncoder",
    "special_token_ids_to_suppress",
    "caption_messages",
    "conditioning_messages",
    "attention_implementation",
]

# The official caption instruction, verbatim from the authors' demo (including its markdown and spacing): the
# released encoder was trained with it, so a paraphrase would shift the caption distribution.
CAPTION_PROMPT = (
    "You are an expert vision-language model.  \n"
    "Your task is: Given an input image, generate a **textual description** of the image. "
    'If there is text in the image, transcribe it inside double quotes "".  \n'
    "Now, carefully analyze the input image and output the full description. "
)
NEGATIVE_PROMPT = "Generate a random, low quality, ugly, blur, bad and anime, cartoon image."
# UAE feeds captions to the decoder as a chat turn of this (non-standard) role.
GENERATE_ROLE = "generate"

# Projector sizes of the released 3B checkpoint; tiny configs store their own in the config.
_DEFAULT_PROJECTOR_HIDDEN = 8192
_DEFAULT_PROJECTOR_OUT = 4096


def attention_implementation() -> str:
    """`flash_attention_2` when flash-attn and a CUDA device are present, else PyTorch SDPA (which has its own fused
    CPU and GPU kernels). flash-attn is probed, never imported here: it fails to import without CUDA."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def caption_messages(prompt: str = CAPTION_PROMPT) -> list[dict]:
    """Chat messages asking for a caption of one image (text first, then the image, as the official demo)."""
    return [{"role": "user", "content": [{"type": "text", "text": prompt}, {"type": "image"}]}]


def conditioning_messages(caption: str) -> list[dict]:
    """Chat messages that wrap a caption for the decoder's `llm` conditioning."""
    return [{"role": GENERATE_ROLE, "content": [{"type": "text", "text": caption}]}]


class UAEEncoder(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL with UAE's projector `Sequential(Linear(H, 8192), GELU(), Linear(8192, 4096))`.

    The projector sizes come from `config.projector_hidden_size` / `config.projector_out_size` when present
    (tiny presets), else the released 3B values.
    """

    def __init__(self, config):
        super().__init__(config)
        hidden = config.text_config.hidden_size
        proj_hidden = getattr(config, "projector_hidden_size", _DEFAULT_PROJECTOR_HIDDEN)
        proj_out = getattr(config, "projector_out_size", _DEFAULT_PROJECTOR_OUT)
        self.projector = nn.Sequential(nn.Linear(hidden, proj_hidden), nn.GELU(), nn.Linear(proj_hidden, proj_out))
        self.post_init()

    @property
    def conditioning_dim(self) -> int:
        """Width of the projected embeddings (SD3's `joint_attention_dim`)."""
        return self.projector[2].out_features

    def project(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text-only pass of the language model, last hidden states of every token → projector.

        Args:
            input_ids: [B, L] templated captions, right-padded.
            attention_mask: [B, L] 1 for real tokens.

        Returns:
            [B, L, D] prompt embeddings (D = `conditioning_dim`); padded positions hold values the caller must mask.
        """
        return self.projector(self.language_states(input_ids, attention_mask))

    def language_states(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The language model's last hidden states [B, L, H] of a text-only pass (what :meth:`project` projects)."""
        # last_hidden_state is after the final RMSNorm, which is what `hidden_states[-1]` was in the transformers
        # versions the released checkpoint was trained with.
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    # ------------------------------------------------------------------ LoRA adapters
    @property
    def lora_model(self):
        """The PEFT model wrapping the inner `Qwen2_5_VLModel` (`self.model`) when adapters are attached, else None.

        Its `disable_adapter()` context gives the base model; `save_pretrained` writes the adapter folder.
        """
        model = self.model
        return model if hasattr(model, "peft_config") and hasattr(model, "disable_adapter") else None

    def attach_lora(self, config):
        """Wrap the inner model (`self.model`, vision tower + language model) with new LoRA adapters, in place.

        The LoRA layers are injected into the existing modules, so references to `self.model.language_model` etc.
        taken before stay valid; the projector and LM head are not wrapped. Target names in `config` are relative
        to `self.model` (e.g. `language_model.layers.0.self_attn.q_proj`).

        Args:
            config: a `peft.LoraConfig`.

        Returns:
            The `peft.PeftModel` now at `self.model` (also `self.lora_model`).

        Raises:
            ConfigError: adapters are already attached (train or load into those instead).
        """
        from peft import get_peft_model

        from ..errors import ConfigError

        if self.lora_model is not None:
            raise ConfigError("the encoder already carries LoRA adapters; attach_lora adds the first set only")
        self.model = get_peft_model(self.model, config)
        return self.model

    def load_lora(self, path) -> None:
        """Attach the LoRA adapters saved at `path`: a PEFT adapter folder (ours) or the release's `llm_lora/`
        full-state-dict shards (see `uae_fast.models.lora`). In place, like :meth:`attach_lora`."""
        from peft import PeftModel

        from ..errors import ConfigError
        from .lora import load_release_lora

        if self.lora_model is not None:
            raise ConfigError("the encoder already carries LoRA adapters; load_lora adds the first set only")
        path = Path(path)
        if (path / "adapter_config.json").exists():
            self.model = PeftModel.from_pretrained(self.model, str(path))
        else:
            load_release_lora(self, path)


def special_token_ids_to_suppress(tokenizer, keep: Sequence[int]) -> list[int]:
    """Ids of special tokens the policy must never sample (vision pads break the next forward), except `keep`."""
    keep_set = set(keep)
    ids = {tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}
    ids |= set(getattr(tokenizer, "added_tokens_decoder", {}).keys())
    return sorted(i for i in ids if i is not None and i >= 0 and i not in keep_set)
