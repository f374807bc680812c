"""Inputs of the stage-2a benchmark: a realistic-tiny UAE checkpoint, 448 x 448 source photos, a tiny reward backbone.

The tiny preset's encoder has a ~800-token vocabulary and 128^2-pixel images, which hides the two costs that dominate
a real stage-2a step: the LM head over Qwen's 151,936-entry vocabulary (sampling, log-probs, loss) and the 256 image
tokens (1024 ViT patches) of a 448 x 448 image. This checkpoint keeps both at their real sizes and everything else
small (text hidden 128, 2 layers; ViT 64 wide, 2 blocks; the tiny preset's DiT, VAE and text encoders), so a GRPO step
runs on a CPU in seconds while its cost profile has the real shape.

Shape `qwen3b` (`prepare(root, shape="qwen3b")`) gives the language model Qwen2.5-VL-3B's widths — hidden 2048, 16
heads, 2 KV heads (head_dim 128, mrope sections [16, 24, 24]), intermediate 11008 — with 2 layers; the ViT, projector,
DiT and VAE stay as in `stage2a`. Its LLM has ~470 M parameters (311 M of them the tied 151,936 x 2048 embedding).

The tokenizer is Qwen's layout with made-up pieces: the tiny preset's byte-level BPE (its merges and ~800 pieces),
filler pieces " aaa", " aab", ... up to 151,643 regular ids, Qwen's 22 special tokens at their real ids
(151643-151664: ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ..., ``<|image_pad|>`` = 151655, ...), and filler
again for the ids Qwen pads the embedding with (151665-151935), so every id the model can sample decodes to text.
Filler pieces are never produced by encoding (no merge builds them) but decode like words, as sampled Qwen ids do.

    python benchmarks/stage2a_setup.py /tmp/uae_s2a            # writes checkpoint/, images/, backbones/ (~10 s)
    python benchmarks/stage2a_setup.py /tmp/uae_s2a qwen3b     # the same under /tmp/uae_s2a/qwen3b (~1 min)
"""

from __future__ import annotations

import itertools
import json
import string
import sys
from pathlib import Path

import torch

__all__ = [
    "QWEN_VOCAB_SIZE",
    "QWEN_SPECIAL_TOKENS",
    "IMAGE_SIZE",
    "SIZES",
    "SHAPES",
    "build_tokenizer",
    "build_processor",
    "build_checkpoint",
    "write_images",
    "prepare",
]

QWEN_VOCAB_SIZE = 151_936  # Qwen2.5-VL's embedding rows (the tokenizer proper has 151,665 entries)
_QWEN_FIRST_SPECIAL = 151_643
# Qwen2.5's added tokens, in id order from 151643.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
IMAGE_SIZE = 448  # 448 x 448 -> 32 x 32 patches of 14 -> 256 merged image tokens
SIZES = {"text_hidden": 128, "text_layers": 2, "vision_hidden": 64, "vision_depth": 2, "projector_hidden": 128}
# Language-model widths per shape (SIZES holds the rest); `qwen3b` = Qwen2.5-VL-3B's text widths, 2 layers.
SHAPES = {
    "stage2a": {},
    "qwen3b": {"hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 2, "intermediate_size": 11008},
}
_DONE = "stage2a_setup.json"  # written last: a folder with it is complete and is reused


def _filler_pieces():
    """' aaa', ' aab', ... as byte-level pieces ('Ġ' is the byte-level form of a space)."""
    for n in (3, 4, 5):
        for letters in itertools.product(string.ascii_lowercase, repeat=n):
            yield "Ġ" + "".join(letters)


def build_tokenizer():
    """A Qwen2Tokenizer with 151,936 entries (see the module docstring); takes well under a second."""
    from transformers import AutoTokenizer, Qwen2Tokenizer

    from uae_fast.presets.tiny import tiny_assets_dir

    source = tiny_assets_dir() / "qwen_tokenizer"
    data = json.loads((source / "tokenizer.json").read_text())
    tiny_specials = {t["content"] for t in data["added_tokens"]}
    base = sorted((i, piece) for piece, i in data["model"]["vocab"].items() if piece not in tiny_specials)
    vocab = {piece: new_id for new_id, (_, piece) in enumerate(base)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    specials = range(_QWEN_FIRST_SPECIAL, _QWEN_FIRST_SPECIAL + len(QWEN_SPECIAL_TOKENS))
    pieces = (p for p in _filler_pieces() if p not in vocab)
    for i in range(len(vocab), QWEN_VOCAB_SIZE):
        if i not in specials:
            vocab[next(pieces)] = i
    for i, token in zip(specials, QWEN_SPECIAL_TOKENS):
        vocab[token] = i
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, errors="replace")  # merges must be tuples, not strings
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = AutoTokenizer.from_pretrained(source).chat_template  # Qwen2-VL format, any role
    tokenizer.model_max_length = 32768
    tokenizer.padding_side = "left"
    assert len(tokenizer) == QWEN_VOCAB_SIZE, len(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151_655
    return tokenizer


def build_processor(tokenizer):
    """Qwen2.5-VL processor whose image processor caps images at 448 x 448 pixels (as UAE's 3B runs can)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    pixels = IMAGE_SIZE * IMAGE_SIZE
    image_processor = Qwen2VLImageProcessor(
        min_pixels=56 * 56, max_pixels=pixels, size={"shortest_edge": 56 * 56, "longest_edge": pixels}
    )
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),  # unused, but the processor class requires one
        chat_template=tokenizer.chat_template,
    )


def _encoder(tokenizer, joint_dim: int, shape: str = "stage2a"):
    from uae_fast.presets.tiny import qwen_encoder, qwen_encoder_config

    widths = SHAPES[shape]
    config = qwen_encoder_config(
        tokenizer,
        vocab_size=QWEN_VOCAB_SIZE,
        text_hidden=widths.get("hidden_size", SIZES["text_hidden"]),
        vision_hidden=SIZES["vision_hidden"],
        projector_hidden=SIZES["projector_hidden"],
        joint_dim=joint_dim,
        text_layers=SIZES["text_layers"],
        vision_depth=SIZES["vision_depth"],
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=True,  # as Qwen2.5-VL-3B, UAE's encoder
    )
    if widths:
        for key, value in widths.items():
            setattr(config.text_config, key, value)
        head_dim = widths["hidden_size"] // widths["num_attention_heads"]
        assert head_dim == 128, head_dim
        config.text_config.rope_parameters["mrope_section"] = [16, 24, 24]  # Qwen2.5-VL's, head_dim 128
    return qwen_encoder(config)


def build_checkpoint(folder: str | Path, seed: int = 0, shape: str = "stage2a") -> Path:
    """Write the realistic-tiny UAE to `folder` in the released layout (llm/, SD3/, dit/); returns the folder.

    `uae_fast.load(folder)` loads it; `Qwen2_5_VLForConditionalGeneration.from_pretrained(folder / "llm")` loads the
    encoder as a plain Qwen2.5-VL (the `projector.*` weights are reported as unexpected and skipped).
    """
    from transformers import AutoTokenizer

    from uae_fast.models.components import UAEComponents, save_components
    from uae_fast.presets.tiny import TINY, _dit_and_vae, _text_encoders, tiny_assets_dir

    assets = tiny_assets_dir()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_tokenizer()
        processor = build_processor(tokenizer)
        encoder = _encoder(tokenizer, TINY["joint_dim"], shape)
        text_encoders = _text_encoders(
            AutoTokenizer.from_pretrained(assets / "clip_tokenizer"),
            AutoTokenizer.from_pretrained(assets / "t5_tokenizer"),
        )
        transformer, vae, scheduler = _dit_and_vae()
    components = UAEComponents(encoder, processor, transformer, vae, scheduler, text_encoders)
    return save_components(components, folder)


def write_images(folder: str | Path, size: int = IMAGE_SIZE) -> list[Path]:
    """The demo photographs (astronaut, chelsea, coffee, rocket), centre-cropped and resized to size x size PNGs."""
    from PIL import Image

    from uae_fast.data.demo import demo_images

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for item in demo_images():
        image = item.image
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        square = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
        path = folder / f"{item.name}.png"
        square.save(path)
        paths.append(path)
    return paths


def prepare(root: str | Path, seed: int = 0, shape: str = "stage2a") -> dict[str, str]:
    """Build (or reuse) root/checkpoint, root/images and root/backbones; returns their paths as strings.

    Keys: "checkpoint", "images", "dinov2" (tiny DINOv2 reward backbone folder). `shape` (a key of SHAPES) other
    than "stage2a" builds into root/<shape>, so one root holds every shape.
    """
    from uae_fast.rewards import save_tiny_backbones

    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    root = Path(root) if shape == "stage2a" else Path(root) / shape
    done = root / _DONE
    if done.exists():
        return json.loads(done.read_text())
    root.mkdir(parents=True, exist_ok=True)
    build_checkpoint(root / "checkpoint", seed, shape)
    write_images(root / "images")
    backbones = save_tiny_backbones(root / "backbones", seed)
    paths = {"checkpoint": str(root / "checkpoint"), "images": str(root / "images"), "dinov2": str(backbones["dinov2"])}
    done.write_text(json.dumps(paths, indent=2))
    return paths


if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else "/tmp/uae_s2a"
    print(json.dumps(prepare(root, shape=sys.argv[2] if len(sys.argv) > 2 else "stage2a"), indent=2))
