"""Qwen2.5-VL preprocessing, file bytes -> pixel_values: ours (C++) vs transformers' processors after a Pillow decode.

Inputs are real photographs (scikit-image's bundled ones) resized/cropped to mixed sizes with the long side in
512-2048 px and JPEG-encoded in memory. Every variant starts from the same bytes and ends with pixel_values +
image_grid_thw. Thread counts are explicit (torch is pinned to one thread; ours uses `threads` for both decoding
and preprocessing). Variants run interleaved and the median is reported, because this machine is shared.

Usage: python benchmarks/bench_preprocess.py [--quick] [--images N] [--repeats R]
"""

from __future__ import annotations

import argparse
import io
import os
import sys

import numpy as np
import skimage.data
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from utils import fmt_ratio, interleaved_medians, markdown_table  # noqa: E402

from uae_fast.data.decode import ImageDecoder, available_backends  # noqa: E402
from uae_fast.data.images import load_image  # noqa: E402
from uae_fast.data.preprocess import qwen_preprocess_bytes  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """n JPEGs of real photos: random crop (aspect 1:2 .. 2:1), resized so the long side is 512-2048 px."""
    rng = np.random.default_rng(seed)
    bases = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]
    out = []
    for i in range(n):
        img = bases[i % len(bases)]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((x0, y0, x0 + cw, y0 + ch))
        long_side = int(rng.integers(512, 2049))
        aspect = float(np.clip(rng.uniform(0.5, 2.0), 0.5, 2.0))
        size = (
            (long_side, max(16, int(long_side / aspect)))
            if aspect >= 1
            else (max(16, int(long_side * aspect)), long_side)
        )
        buf = io.BytesIO()
        crop.resize(size, Image.BICUBIC).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 images, 1 repeat (same rows)")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    n = args.images or (64 if args.quick else 256)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(1)
    from transformers.models.qwen2_vl import Qwen2VLImageProcessor, Qwen2VLImageProcessorPil

    data = make_jpegs(n)
    mpix = np.mean([np.prod(Image.open(io.BytesIO(d)).size) for d in data]) / 1e6
    load = os.getloadavg()[0]
    print(f"{n} JPEGs, mean {mpix:.2f} MP; backends: {available_backends()}; 1 torch thread; load avg {load:.1f}\n")
    rows = []
    for max_pixels, label in ((448 * 448, "448²"), (256 * 256, "256²")):
        tv = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=max_pixels)
        pil = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=max_pixels)

        def run_processor(proc):
            return proc(images=[load_image(d) for d in data], return_tensors="pt")

        # One decoder per configuration, reused across calls as a training loop would (thread pool, DALI pipeline).
        decoders = {(t, b): ImageDecoder(b, threads=t) for t in (1, 2) for b in available_backends()}

        def ours(threads, reduced=False, backend="cpu"):
            return qwen_preprocess_bytes(
                data,
                max_pixels=max_pixels,
                threads=threads,
                reduced_decode=reduced,
                decoder=decoders[(threads, backend)],
            )

        variants = {
            "Pillow decode + Qwen2VLImageProcessorPil": (1, lambda: run_processor(pil)),
            "Pillow decode + Qwen2VLImageProcessor (torchvision)": (1, lambda: run_processor(tv)),
            "ours: simplejpeg + C++ (exact)": (1, lambda: ours(1)),
            "ours: simplejpeg + C++ (exact), 2 threads": (2, lambda: ours(2)),
            "ours: reduced DCT decode (opt-in fast mode)": (1, lambda: ours(1, reduced=True)),
        }
        if "dali-cpu" in available_backends():
            variants["ours: DALI CPU decode + C++ (exact)"] = (1, lambda: ours(1, backend="dali-cpu"))
        times = interleaved_medians({k: fn for k, (_, fn) in variants.items()}, repeats=repeats, warmup=1)
        ref = run_processor(tv)
        ref_pil = run_processor(pil)
        t_tv = times["Pillow decode + Qwen2VLImageProcessor (torchvision)"]
        t_pil = times["Pillow decode + Qwen2VLImageProcessorPil"]
        for name, (threads, fn) in variants.items():
            out = fn()
            want = ref_pil if name.endswith("ProcessorPil") else ref
            same_grid = torch.equal(torch.as_tensor(out["image_grid_thw"]), torch.as_tensor(want["image_grid_thw"]))
            if same_grid:
                diff = (torch.as_tensor(out["pixel_values"]) - torch.as_tensor(want["pixel_values"])).abs()
                dmax, dmean = f"{diff.max().item():.3g}", f"{diff.mean().item():.2e}"
            else:
                dmax = dmean = "grid differs"
            rows.append(
                {
                    "max_pixels": label,
                    "pipeline (file bytes → pixel_values)": name,
                    "threads": threads,
                    "img/s": f"{n / times[name]:.0f}",
                    "vs torchvision proc": fmt_ratio(t_tv, times[name]),
                    "vs PIL proc": fmt_ratio(t_pil, times[name]),
                    "max abs Δ vs its reference": dmax,
                    "mean abs Δ": dmean,
                }
            )
    cols = list(rows[0])
    print(markdown_table(rows, cols))
    print("\nReference for Δ: the torchvision processor (the PIL processor for its own row). Ratios > 1 = faster.")


if __name__ == "__main__":
    main()
