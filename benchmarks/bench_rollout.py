"""Caption rollout speed: our captioner (`uae_fast.models.captioner.Captioner.sample`) vs transformers `generate`.

One rollout = B source images (448 x 448 photographs, 256 image tokens each) -> G captions per image of at most
--max-tokens new tokens, temperature 0.7, top-p 1 (top-k off), vision/chat special tokens suppressed, `<|im_end|>`
ends a caption. Timed from decoded pixels to sampled token ids (preprocessing, vision tower, prefill, decoding).
Rows, all on the same model in the same process, interleaved round by round (median of --repeats):

- `generate, prompt x G`: TRL's way — every prompt (and its image) repeated G times, `processor` + `generate`.
- `generate, num_return_sequences=G`: B prompts, `generate` expands them after preprocessing (the vision tower and
  the prompt prefill still run G times per image, on the expanded batch).
- `before (<rev>)`: `Captioner.sample` as it was at git revision --before (default: the last one with the
  DynamicCache token loop: the prefix cache repeated G times, every row forwarded through transformers' text model
  every token until all have ended), loaded from git into this process; skipped when git or the revision is missing.
- `ours`: `Captioner.sample` now (one prefill per image, prefix-shared static KV cache, finished rows dropped).

Shapes: `stage2a` is the stage-2a benchmark's encoder (`stage2a_setup.py`: vocabulary 151,936, text hidden 128,
2 layers); `qwen3b` has Qwen2.5-VL-3B's text widths (hidden 2048, 16 heads, 2 KV heads, intermediate 11008,
vocabulary 151,936) with 2 layers and the same small vision tower; `tiny` is the tiny preset (tests). Weights are
random, so captions mostly run to --max-tokens; tokens/s counts the tokens actually sampled (end token included).
Peak memory: what one more call of each row adds to the process's resident memory after the timed rounds (VmHWM
after − VmRSS before; glibc is then told to return large freed blocks to the system, so each call starts from the
same base — the timed rounds run with glibc's defaults). The model is frozen, as stage 2a's LoRA-trained captioner
is: on a CPU our rollout keeps the LM head's MKL pack between calls (made in the warm-up round, not in this column;
see `PackedHead`).

    python benchmarks/bench_rollout.py            # both shapes, B=4 x G=8, 32 new tokens, 5 repeats (~15 min)
    python benchmarks/bench_rollout.py --quick    # B=2 x G=4, 8 new tokens, 2 repeats (~3 min; the tiny shape ~20 s)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utils import (  # noqa: E402
    child_report,
    current_rss_mb,
    fmt_ratio,
    markdown_table,
    measure_peak_in_child,
    peak_rss_mb,
    reset_peak_rss,
)

__all__ = ["build", "variants", "main"]

TEMPERATURE = 0.7
REPO = Path(__file__).resolve().parents[1]
BEFORE = "74df164"  # the last revision whose Captioner.sample ran the DynamicCache token loop
QWEN3B = {"hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 2, "intermediate_size": 11008}


def build(shape: str, seed: int = 0):
    """(encoder, processor) of a shape, random weights from `seed`; fp32, eval mode, CPU."""
    import torch

    torch.manual_seed(seed)
    if shape == "tiny":
        import uae_fast

        uae = uae_fast.load("tiny", device="cpu")
        return uae.encoder, uae.processor
    from stage2a_setup import SIZES, build_processor, build_tokenizer

    from uae_fast.presets.tiny import TINY, qwen_encoder, qwen_encoder_config

    tokenizer = build_tokenizer()
    hidden = QWEN3B["hidden_size"] if shape == "qwen3b" else SIZES["text_hidden"]
    config = qwen_encoder_config(
        tokenizer,
        vocab_size=151_936,
        text_hidden=hidden,
        vision_hidden=SIZES["vision_hidden"],
        projector_hidden=SIZES["projector_hidden"],
        joint_dim=TINY["joint_dim"],
        text_layers=SIZES["text_layers"],
        vision_depth=SIZES["vision_depth"],
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    )
    if shape == "qwen3b":
        for key, value in QWEN3B.items():
            setattr(config.text_config, key, value)
        config.text_config.rope_parameters["mrope_section"] = [16, 24, 24]  # Qwen2.5-VL's, head_dim 128
    return qwen_encoder(config), build_processor(tokenizer)


def source_images(count: int, size: int):
    """`count` demo photographs (cycled), centre-cropped to size x size RGB PIL images."""
    from PIL import Image

    from uae_fast.data.demo import demo_images

    out = []
    for item in demo_images():
        image = item.image.convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        out.append(image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC))
    return [out[i % len(out)] for i in range(count)]


def _captioner_at(rev: str):
    """The `Captioner` class of `uae_fast/models/captioner.py` at git revision `rev`, or None without git/rev."""
    try:
        source = subprocess.run(
            ["git", "show", f"{rev}:uae_fast/models/captioner.py"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    module = types.ModuleType("uae_fast.models._captioner_before")
    module.__package__ = "uae_fast.models"  # its relative imports resolve against the installed package
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, f"{rev}:captioner.py", "exec"), module.__dict__)
    return module.Captioner


def variants(encoder, processor, images, generations: int, max_tokens: int, before: str | None, device="cpu") -> dict:
    """name -> callable returning the number of sampled tokens of one rollout."""
    import numpy as np
    import torch

    from uae_fast.models.captioner import Captioner
    from uae_fast.models.encoder import caption_messages, special_token_ids_to_suppress

    ours = Captioner(encoder, processor, batch_size=len(images) * generations)
    arrays = [np.asarray(im) for im in images]
    tokenizer = processor.tokenizer
    settings = dict(
        do_sample=True,
        temperature=TEMPERATURE,
        top_p=1.0,
        top_k=0,
        max_new_tokens=max_tokens,
        suppress_tokens=special_token_ids_to_suppress(tokenizer, keep=ours.eos_ids),
        eos_token_id=ours.eos_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    text = processor.apply_chat_template(caption_messages(), tokenize=False, add_generation_prompt=True)
    eos = torch.tensor(ours.eos_ids)

    def generated(out: torch.Tensor, prompt_len: int) -> int:
        new = out[:, prompt_len:]  # [N, T]: up to the first end token, then pads
        ended = torch.isin(new, eos)
        first = torch.where(ended.any(1), ended.int().argmax(1) + 1, new.shape[1])
        return int(first.sum())

    def hf(repeat: int, sequences: int):
        def run() -> int:
            inputs = processor(
                text=[text] * (len(images) * repeat),
                images=[im for im in images for _ in range(repeat)],
                padding=True,
                padding_side="left",
                return_tensors="pt",
            ).to(device)
            with torch.no_grad():
                out = encoder.generate(**inputs, num_return_sequences=sequences, **settings)
            return generated(out, inputs["input_ids"].shape[1])

        return run

    def sampler(captioner):
        def run() -> int:
            encoded = captioner.encode_images(arrays)
            comp = captioner.sample(encoded, generations, max_new_tokens=max_tokens, temperature=TEMPERATURE)
            return int(comp.lengths.sum())

        return run

    rows = {
        "generate, prompt x G (TRL)": hf(generations, 1),
        "generate, num_return_sequences=G": hf(1, generations),
    }
    old = _captioner_at(before) if before else None
    if old is not None:
        rows[f"before ({before})"] = sampler(old(encoder, processor, batch_size=len(images) * generations))
    rows["ours"] = sampler(ours)
    return rows


def _child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    _quiet()
    encoder, processor = build(args.child, args.seed)
    # frozen, as stage 2a's captioner is under LoRA (its base and LM head): a frozen head's CPU pack is kept between
    # rollouts, a trained one is packed per rollout (see `PackedHead`)
    encoder.requires_grad_(False).to(device=args.device, dtype=getattr(torch, args.dtype))
    cuda = args.device == "cuda"
    images = source_images(args.images, args.size)
    runs = variants(encoder, processor, images, args.generations, args.max_tokens, args.before, args.device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, list[int]] = {name: [] for name in runs}
    peaks: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(args.warmup + args.repeats):
        for name, run in runs.items():
            torch.manual_seed(args.seed + round_)
            start = time.perf_counter()
            count = run()
            if cuda:
                torch.cuda.synchronize()  # asynchronous kernels are charged to the rollout that launched them
            elapsed = time.perf_counter() - start
            if round_ >= args.warmup:
                times[name].append(elapsed)
                tokens[name].append(count)
    for name, run in runs.items():  # then one more call each, for memory only (timings ran with glibc's defaults)
        torch.manual_seed(args.seed)
        if cuda:  # on a GPU the memory that matters is the device's: the allocator's peak above what is held
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            run()
            peaks[name].append((torch.cuda.max_memory_allocated() - base) / 2**20)
            continue
        _return_freed_memory()  # what earlier calls freed would otherwise be reused without raising the RSS
        base = current_rss_mb()
        reset_peak_rss()
        run()
        peaks[name].append(peak_rss_mb() - base)
    child_report(
        {
            name: {
                "time": statistics.median(times[name]),
                "tokens": statistics.median(tokens[name]),
                "tokens_per_s": statistics.median(n / t for n, t in zip(tokens[name], times[name])),
                "peak_add": statistics.median(peaks[name]),
            }
            for name in runs
        }
    )


def _return_freed_memory() -> None:
    """Make glibc hand large freed blocks back to the system (fixed 128 KiB mmap/trim thresholds, then a trim), so
    the resident size before each memory-measuring call is the same base. Linux/glibc only; a no-op elsewhere."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 131072)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 131072)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _quiet() -> None:
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


def rows_of(shape: str, result: dict) -> list[dict]:
    """Table rows of one shape; the ratio column is ours / this row, in tokens/s."""
    ours = result["ours"]["tokens_per_s"]
    return [
        {
            "shape": shape,
            "variant": name,
            "tokens": f"{r['tokens']:.0f}",
            "time (s)": f"{r['time']:.3f}",
            "tokens/s": f"{r['tokens_per_s']:.0f}",
            "peak +MB": f"{r['peak_add']:.0f}",
            "ours vs this (tokens/s)": fmt_ratio(ours, r["tokens_per_s"]),
        }
        for name, r in result.items()
    ]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="B=2 x G=4, 8 new tokens, 2 repeats (~3 min for both shapes)")
    p.add_argument("--shapes", nargs="+", default=["stage2a", "qwen3b"], choices=["stage2a", "qwen3b", "tiny"])
    p.add_argument("--images", type=int, default=4, help="source images B (default 4)")
    p.add_argument("--generations", type=int, default=8, help="captions per image G (default 8)")
    p.add_argument("--max-tokens", type=int, default=32, help="max new tokens (default 32)")
    p.add_argument("--size", type=int, default=448, help="source image side in pixels (default 448)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds (default 1)")
    # 1 by default: on the shared 2-core machines, 2 threads made every parallel op wait on a descheduled thread
    # (the same rollout took 2-10x longer, and the rows' ratios swung from 0.9x to 1.8x between runs).
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument(
        "--before",
        default=BEFORE,
        help=f"git revision of the rollout to compare with ('' for none; default {BEFORE}, the DynamicCache loop)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype, every row")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where every row runs (cuda: peak = GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.generations, args.max_tokens, args.repeats = 2, 4, 8, min(args.repeats, 2)
    if args.child:
        return _child(args)
    passed = ["--images", str(args.images), "--generations", str(args.generations), "--size", str(args.size)]
    passed += ["--max-tokens", str(args.max_tokens), "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    passed += ["--threads", str(args.threads), "--seed", str(args.seed), "--dtype", args.dtype, "--device", args.device]
    passed += ["--before", args.before]
    rows = []
    for shape in args.shapes:
        start = time.perf_counter()
        result = measure_peak_in_child(__file__, [*passed, "--child", shape])
        print(f"{shape}: child took {time.perf_counter() - start:.0f} s", file=sys.stderr)
        rows += rows_of(shape, result)
    print(
        f"\nCaption rollout, B={args.images} images x G={args.generations}, max {args.max_tokens} new tokens, "
        f"temperature {TEMPERATURE}, {args.size}x{args.size} images, {args.dtype}, {args.threads} threads, "
        f"{args.device.upper()}; "
        f"medians of {args.repeats} interleaved rounds\n"
    )
    print(markdown_table(rows, list(rows[0])))
    return rows


if __name__ == "__main__":
    main()
