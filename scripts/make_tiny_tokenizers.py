"""Generate the tokenizer files of the `tiny` preset (shipped in uae_fast/presets/tiny_assets/).

No tokenizer can be downloaded on the machines we test on, so the tiny preset carries its own: small BPE/unigram
vocabularies trained here on a synthetic caption corpus, wrapped in the same transformers classes the real
checkpoints use (Qwen2Tokenizer, CLIPTokenizer, T5Tokenizer), so they load through the same `from_pretrained` code.
The corpus is deterministic, but the `tokenizers` trainer breaks count ties in hash order, so a rerun may
renumber a few tied tokens: rerunning means re-shipping the files (and the tiny preset changes with them).
Usage: `python scripts/make_tiny_tokenizers.py [OUT_DIR]`.
"""

from __future__ import annotations

import itertools
import json
import random
import sys
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer, Qwen2Tokenizer, T5Tokenizer

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "uae_fast" / "presets" / "tiny_assets"

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The Qwen2-VL chat format: an implicit system turn, images as <|vision_start|><|image_pad|><|vision_end|> (the
# processor expands the pad to one token per merged patch), any role name (UAE's decoder uses role "generate").
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_COLORS = "red green blue yellow white black gray brown orange purple pink golden silver dark bright pale".split()
_THINGS = (
    "cat dog woman man child astronaut rocket cup coffee table chair tree house car road sky cloud mountain lake "
    "river flower bird horse boat window door street city field forest beach sea sun moon book phone lamp wall"
).split()
_PLACES = "in a room|on a table|under the sky|near the water|in the street|on the grass|in front of a wall".split("|")
_STYLE = "photo|close-up photograph|wide shot|portrait|detailed picture|blurry image|sharp photo".split("|")
_FIXED_TEXT = [
    "You are an expert vision-language model. Your task is: Given an input image, generate a textual description "
    'of the image. If there is text in the image, transcribe it inside double quotes "". Now, carefully analyze '
    "the input image and output the full description.",
    "Generate a random, low quality, ugly, blur, bad and anime, cartoon image.",
    "You are a helpful assistant.",
]


def caption_corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """Synthetic captions: enough variety for a few hundred merges, fully deterministic."""
    rng = random.Random(seed)
    lines = list(_FIXED_TEXT) * 20
    for _ in range(n):
        a, b = rng.sample(_THINGS, 2)
        lines.append(
            f"A {rng.choice(_STYLE)} of a {rng.choice(_COLORS)} {a} {rng.choice(_PLACES)}, "
            f"with a {rng.choice(_COLORS)} {b}. The {a} is {rng.choice(_COLORS)} and {rng.randint(1, 99)} "
            f'"{rng.choice(_THINGS).upper()}" is written on it.'
        )
    return lines


def _train_bpe(corpus: list[str], vocab_size: int, pre_tokenizer, suffix: str = "") -> tuple[dict, list]:
    suffix_kw = {"end_of_word_suffix": suffix} if suffix else {}
    tok = Tokenizer(models.BPE(**suffix_kw))
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False, **suffix_kw
    )
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def make_qwen(corpus: list[str], out: Path, vocab_size: int = 1000) -> None:
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    vocab, merges = _train_bpe(corpus, vocab_size, pre)
    for special in QWEN_SPECIALS:  # specials sit after the learned vocabulary, as in Qwen's own files
        vocab.setdefault(special, len(vocab))
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, errors="replace")
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:]})
    tok.chat_template = QWEN_CHAT_TEMPLATE
    tok.model_max_length = 32768
    tok.save_pretrained(out)


def make_clip(corpus: list[str], out: Path, vocab_size: int = 800) -> None:
    lowered = [line.lower() for line in corpus]
    pre = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    vocab, merges = _train_bpe(lowered, vocab_size, pre, suffix="</w>")
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tok.save_pretrained(out)


def make_t5(corpus: list[str], out: Path, vocab_size: int = 600) -> None:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    pieces = [(piece, round(float(score), 6)) for piece, score in json.loads(tok.to_str())["model"]["vocab"]]
    t5 = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    t5.save_pretrained(out)


def main(out: Path = DEFAULT_OUT) -> None:
    corpus = caption_corpus()
    make_qwen(corpus, out / "qwen_tokenizer")
    make_clip(corpus, out / "clip_tokenizer")
    make_t5(corpus, out / "t5_tokenizer")
    for path in sorted(itertools.chain(out.rglob("*.json"), out.rglob("*.txt"))):
        print(path.relative_to(out), path.stat().st_size)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
