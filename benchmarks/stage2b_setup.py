"""Inputs and child harness of the stage-2b benchmark: a UAE checkpoint whose DiT has SD3.5-Medium's width, fixed
256-token captions, and the token ring that interleaves the variants' children.

Stage 2b's cost is the DiT: every rollout step runs it on both CFG branches, every trained step again with grad. This
checkpoint keeps the DiT at SD3.5-Medium's MM-DiT width (24 heads x 64 = 1536, qk RMS-norm, patch 2, 16 latent
channels) with only `layers` transformer blocks, and everything else tiny (the tiny preset's Qwen2.5-VL encoder and
projector, whose 64-wide output is the DiT's `joint_attention_dim`; its CLIP encoders, whose pooled "" is the 64-wide
`pooled_projections`; its 8x VAE). A 512 x 512 render is a 16 x 64 x 64 latent, 1024 image tokens in the DiT.

It is written with `UAE.save_pretrained` (the released layout plus `uae_fast.json`) and read back with
`uae_fast.load`, as a user's run would read it.

Encoder (`encoder=`): `tiny` keeps the tiny preset's LLM (64 wide); `qwen3b` gives the LLM Qwen2.5-VL-3B's text
widths (hidden 2048, 16 heads, 2 KV heads, head_dim 128, intermediate 11008) with 2 layers and UAE's projector
(2048 -> 8192 -> 4096, so the DiT's `joint_attention_dim` is SD3.5's 4096; the pooled embedding is SD3.5's pooled "",
as in the released model), keeping the tiny tokenizer (conditioning never runs the LM head over the vocabulary). Its
2 LLM layers against the DiT's 2 blocks keep the conditioning's share of a training step near the real 36 layers
against 24 blocks. Stage 1's benchmark uses it; stage 2b's keeps `tiny`.

Captions: the tiny captioner is random and would stop after a few tokens, so both benchmark paths condition on fixed
captions of exactly `CAPTION_TOKENS` tokens (the tiny tokenizer's count of the caption text; the `llm`-mode chat
template adds a few), one per demo photograph, made of random words from the tokenizer's vocabulary.

The harness (`run_round`, `Ring`, `Clock`) runs the benchmark's variants as concurrent child processes that pass a
token around, so their DiT forwards interleave one by one while each keeps its own peak RSS.

`prepare` also writes `pairs/`: the captioned photographs as size x size JPEGs with `<key>.txt` captions, a folder
that `data.images=DIR` reads as (image, caption) pairs (stage 1's benchmark).

    python benchmarks/stage2b_setup.py /tmp/uae_s2b [--quick]   # writes checkpoint/ and captions.json (~10 s)
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

__all__ = ["SHAPES", "ENCODERS", "CAPTION_TOKENS", "build_dit", "build_encoder", "fixed_captions", "write_pairs",
           "prepare", "Ring", "Clock", "run_round"]  # fmt: skip

DIT_HEADS, DIT_HEAD_DIM = 24, 64  # SD3.5-Medium: 1536 wide
CAPTION_TOKENS = 256
# full: 2 blocks, 512 x 512 renders (16 x 64 x 64 latents); quick: 1 block, 256 x 256 (16 x 32 x 32)
SHAPES = {"full": {"layers": 2, "size": 512}, "quick": {"layers": 1, "size": 256}}
# encoder LLM widths (see the module docstring); "tiny": the preset's
ENCODERS = {
    "tiny": {},
    "qwen3b": {"hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 2, "intermediate_size": 11008,
               "projector_hidden": 8192, "joint_dim": 4096},
}  # fmt: skip
_DONE = "stage2b_setup.json"  # written last: a folder with it is complete and is reused


def build_dit(layers: int, size: int, joint_dim: int, pooled_dim: int, heads: int = DIT_HEADS):
    """An SD3 MM-DiT of SD3.5-Medium's width (`heads` x 64; fewer only for tests) with `layers` blocks, for
    size x size renders (VAE factor 8)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=size // 8,
        patch_size=2,
        in_channels=16,
        num_layers=layers,
        attention_head_dim=DIT_HEAD_DIM,
        num_attention_heads=heads,
        joint_attention_dim=joint_dim,  # the encoder projector's output width (llm conditioning)
        caption_projection_dim=heads * DIT_HEAD_DIM,
        pooled_projection_dim=pooled_dim,
        out_channels=16,
        pos_embed_max_size=max(64, size // 16),  # >= latent side / patch
        qk_norm="rms_norm",  # as SD3.5
    ).eval()


def build_encoder(tokenizer, encoder: str):
    """A `UAEEncoder` with the LLM and projector widths of `ENCODERS[encoder]` (not "tiny"), 2 LLM layers, the tiny
    preset's vision tower and the tiny tokenizer's vocabulary, random weights from the global RNG."""
    from uae_fast.presets.tiny import TINY, qwen_encoder, qwen_encoder_config

    widths = ENCODERS[encoder]
    config = qwen_encoder_config(
        tokenizer,
        vocab_size=len(tokenizer),
        text_hidden=widths["hidden_size"],
        vision_hidden=TINY["vision_hidden"],
        projector_hidden=widths["projector_hidden"],
        joint_dim=widths["joint_dim"],
    )
    text = config.text_config
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        setattr(text, key, widths[key])
    assert text.hidden_size // text.num_attention_heads == 128
    text.rope_parameters["mrope_section"] = [16, 24, 24]  # Qwen2.5-VL's, head_dim 128
    return qwen_encoder(config)


def build_checkpoint(
    folder: str | Path, *, layers: int, size: int, seed: int = 0, encoder: str = "tiny", heads: int = DIT_HEADS
) -> Path:
    """The tiny preset with its DiT replaced by `build_dit(layers, size, heads=heads)` and, unless `encoder` is
    "tiny", its encoder by `build_encoder(encoder)`; saved by `UAE.save_pretrained`."""
    import dataclasses

    from uae_fast.api import UAE
    from uae_fast.models.components import InferenceDefaults
    from uae_fast.presets.tiny import TINY, build_tiny

    components = build_tiny(seed)
    joint_dim, wide = TINY["joint_dim"], {}
    with torch.random.fork_rng(devices=[]):
        if encoder != "tiny":
            torch.manual_seed(seed + 2)
            wide = {"encoder": build_encoder(components.processor.tokenizer, encoder), "caption_pooled_weight": 0.0}
            joint_dim = ENCODERS[encoder]["joint_dim"]  # pooled: SD3.5's pooled "" alone (the caption's is 4096 wide)
        torch.manual_seed(seed + 1)
        dit = build_dit(layers, size, joint_dim, 2 * TINY["clip_hidden"], heads)
    defaults = InferenceDefaults(size=size, steps=10, guidance=4.5, max_new_tokens=CAPTION_TOKENS)
    components = dataclasses.replace(components, transformer=dit, inference_defaults=defaults, **wide)
    uae = UAE(components, device="cpu", dtype=torch.float32)
    return uae.save_pretrained(folder)


def fixed_captions(tokenizer, keys: list[str], tokens: int = CAPTION_TOKENS, seed: int = 0) -> dict[str, str]:
    """key -> a caption of random vocabulary words that the tokenizer encodes as exactly `tokens` tokens."""
    words = sorted(p[1:] for p in tokenizer.get_vocab() if p.startswith("Ġ") and p[1:].isalpha() and len(p) > 2)
    rng = random.Random(seed)
    out = {}
    for key in keys:
        text = ""
        while True:
            text = (text + " " + " ".join(rng.choices(words, k=tokens))).strip()
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) < tokens:
                continue
            text = tokenizer.decode(ids[:tokens]).strip()
            if len(tokenizer.encode(text, add_special_tokens=False)) == tokens:
                break
            text = ""  # a cut mid-word re-encoded differently: draw again
        out[key] = text
    return out


def write_pairs(folder: str | Path, captions: dict[str, str], size: int, quality: int = 95) -> Path:
    """The demo photographs named in `captions`, centre-cropped and resized to size x size, as `<key>.jpg` with the
    caption in `<key>.txt` (a folder that `data.images=DIR` reads as image-caption pairs)."""
    from PIL import Image

    from uae_fast.data.demo import demo_images

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for item in demo_images():
        if item.name not in captions:
            continue
        image = item.image.convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        square = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
        square.save(folder / f"{item.name}.jpg", quality=quality)
        (folder / f"{item.name}.txt").write_text(captions[item.name], encoding="utf-8")
    return folder


def prepare(root: str | Path, *, quick: bool = False, seed: int = 0, shape: dict | None = None) -> dict:
    """Build (or reuse) root/<full|quick>/checkpoint, captions.json and pairs/; returns their paths and the shape.

    `shape` replaces SHAPES[full|quick] (stage 1's benchmark): {"name", "layers", "size"} and optionally "encoder"
    (a key of ENCODERS), "heads" and "caption_tokens"; it builds into root/<name>.
    """
    from uae_fast.presets.tiny import tiny_assets_dir
    from uae_fast.train.config import DataConfig
    from uae_fast.train.data import ImageDataset

    shape = dict(shape or SHAPES["quick" if quick else "full"])
    root = Path(root) / shape.pop("name", "quick" if quick else "full")
    done = root / _DONE
    if done.exists():
        return json.loads(done.read_text())
    root.mkdir(parents=True, exist_ok=True)
    build = {k: shape[k] for k in ("encoder", "heads") if k in shape}
    checkpoint = build_checkpoint(root / "checkpoint", layers=shape["layers"], size=shape["size"], seed=seed, **build)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets_dir() / "qwen_tokenizer")
    dataset = ImageDataset(DataConfig(images="demo", shuffle=False), seed=seed)
    keys = [im.key for im in dataset.next_batch(4)]
    captions = fixed_captions(tokenizer, keys, tokens=shape.get("caption_tokens", CAPTION_TOKENS), seed=seed)
    (root / "captions.json").write_text(json.dumps(captions, indent=1))
    pairs = write_pairs(root / "pairs", captions, shape["size"])
    paths = {"checkpoint": str(checkpoint), "captions": str(root / "captions.json"), "pairs": str(pairs), **shape}
    done.write_text(json.dumps(paths, indent=2))
    return paths


# ---------------------------------------------------------------------- the children's harness
class Ring:
    """Token passing between the variant children (one pipe each, in a ring): a child computes only while it holds
    the token and passes it on before every DiT forward, so the variants' forwards interleave one by one and a busy
    spell of the shared machine falls on all of them; each keeps its own process for its peak RSS."""

    def __init__(self, read_fd: int, write_fd: int, n: int):
        self.r, self.w, self.n, self.done, self.waited = read_fd, write_fd, n, 0, 0.0

    def _recv(self) -> None:
        start = time.perf_counter()
        got = os.read(self.r, 1)
        if not got:
            raise RuntimeError("another benchmark child died")
        self.done = got[0]  # how many children have finished
        self.waited += time.perf_counter() - start

    def _send(self, value: int) -> None:
        try:
            os.write(self.w, bytes([value]))
        except BrokenPipeError:  # the next child has already exited
            pass

    def start(self) -> None:
        """Wait for the token, then for one more round, which proves every child is built."""
        self._recv()
        self.pause()

    def pause(self) -> None:
        self._send(self.done)
        self._recv()

    def finish(self) -> None:
        """Count this child as finished and keep passing the token until every child is."""
        value = self.done + 1
        self._send(value)
        while value < self.n:
            self._recv()
            value = self.done
            self._send(value)


class Clock:
    """Phase times net of the time spent waiting for the ring's token (no ring: plain wall times)."""

    def __init__(self, ring: Ring | None = None):
        self.ring, self.times = ring, {}

    def waited(self) -> float:
        return self.ring.waited if self.ring else 0.0

    def pause(self) -> None:
        if self.ring:
            self.ring.pause()

    def wrap(self, fn, name: str):
        def timed(*args, **kwargs):
            start, waited = time.perf_counter(), self.waited()
            try:
                return fn(*args, **kwargs)
            finally:
                net = time.perf_counter() - start - (self.waited() - waited)
                self.times[name] = self.times.get(name, 0.0) + net

        return timed

    def before(self, fn):
        """`fn` that first passes the token on (a DiT forward)."""

        def paused(*args, **kwargs):
            self.pause()
            return fn(*args, **kwargs)

        return paused


def run_round(script: str, variants: list[str], passed: list[str]) -> dict[str, dict]:
    """`python script *passed --child <variant> --ring r,w,n` for all variants at once, in a token ring (see Ring);
    returns variant -> the child's `child_report` result."""
    from utils import _CHILD_MARK  # the line prefix of `child_report`

    pipes = [os.pipe() for _ in variants]
    children = []
    for i, variant in enumerate(variants):
        r, w = pipes[i][0], pipes[(i + 1) % len(pipes)][1]
        log = tempfile.TemporaryFile("w+")
        cmd = [sys.executable, script, *passed, "--child", variant, "--ring", f"{r},{w},{len(variants)}"]
        children.append((variant, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, pass_fds=(r, w)), log))
    os.write(pipes[0][1], bytes([0]))  # the token, to the first child
    for r, w in pipes:  # only the children hold the ends now: a dead child is an EOF to its successor
        os.close(r)
        os.close(w)
    results, failed = {}, []
    for variant, proc, log in children:
        proc.wait()
        log.seek(0)
        text = log.read()
        found = [line[len(_CHILD_MARK) :] for line in text.splitlines() if line.startswith(_CHILD_MARK)]
        if found:
            results[variant] = json.loads(found[0])
        else:
            failed.append(f"child {variant} failed:\n{text[-3000:]}")
    if failed:
        raise RuntimeError("\n".join(failed))
    return results


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--quick"]
    print(json.dumps(prepare(args[0] if args else "/tmp/uae_s2b", quick="--quick" in sys.argv), indent=2))
