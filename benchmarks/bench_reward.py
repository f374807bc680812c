"""Reconstruction reward: our batched path vs scoring every (source, reconstruction) pair independently.

One GRPO step scores B sources x G reconstructions each. The peer is what a per-pair scoring script does (as the
authors' Unified-Bench scorer's ``calculate_similarity``): for every pair and every backbone, preprocess and encode
*both* images (batch of one each), normalise, take the cosine, then weight-sum in Python. Ours
(:class:`uae_fast.rewards.ReconstructionReward`): each source encoded once per step (cold cache: included in the
time; a warm cache row shows steps that revisit sources), the B*G reconstructions encoded in one batch per
backbone, CLIP/LongCLIP sharing one preprocessing, and one fused reward kernel. Both use the same models and the
same on-device preprocessing, so the ratio measures structure, not implementation details.

Backbones: ``tiny`` (the four random test backbones) and ``vit-b`` (one random ViT-B-like backbone: DINOv2 blocks
of ViT-B width — 768 wide, 12 heads, MLP 3072, patch 16 at 224 px — with --depth blocks, default 2, so a CPU run
finishes; depth scales both paths alike).

    python benchmarks/bench_reward.py            # B=16, G=8, ~3-4 min on 2 shared cores
    python benchmarks/bench_reward.py --quick    # B=4, under a minute
    python benchmarks/bench_reward.py --device cuda   # on a GPU (bf16 backbones, Triton reward kernel)

Timing: every variant (ours and the peer alike) gets one untimed warm-up call, then --repeats rounds of one call
each, interleaved, median (on CUDA each call ends with a synchronise). Peak memory: each variant runs once more in a
fresh child process after its warm-up; the figure is the peak RSS (CUDA: allocated memory) it adds to its inputs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utils import (  # noqa: E402
    child_report,
    fmt_ratio,
    interleaved_medians,
    markdown_table,
    measure_peak_in_child,
    peak_rss_mb,
    reset_peak_rss,
)

__all__ = ["build_backbones", "per_pair_reward", "main"]


PEER = "per-pair: each (source, reconstruction) pair and backbone encoded as 2 batches of 1, cosine, Python sum"
OURS = {
    "ours (cold cache)": "batched: sources once, B*G reconstructions in one batch per backbone, fused reward kernel",
    "ours (warm cache)": "as cold, source features from the cache (a step that revisits its sources)",
}


def build_backbones(kind: str, depth: int, device: str = "cpu") -> dict:
    """name → FeatureExtractor for a backbone set ("tiny" or "vit-b"); bf16 on CUDA."""
    from uae_fast.rewards import load_backbones

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if kind == "tiny":
        names = ("clip", "dinov2", "dinov3", "longclip")
        return load_backbones({n: "tiny" for n in names}, device=device, dtype=dtype)
    from transformers import Dinov2Config, Dinov2Model

    from uae_fast.rewards.backbones import FeatureExtractor, _cls_token
    from uae_fast.rewards.preprocess import IMAGENET_MEAN, IMAGENET_STD, TensorPreprocess

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=768,
        num_hidden_layers=depth,
        num_attention_heads=12,
        intermediate_size=3072,
        patch_size=16,
        image_size=224,
    )
    pre = TensorPreprocess(shortest_edge=256, crop=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    model = Dinov2Model(config).to(device=device, dtype=dtype)
    return {"dinov2": FeatureExtractor("dinov2", model, pre, _cls_token, 768, "random ViT-B-like")}


def per_pair_reward(backbones: dict, weights: dict, sources: torch.Tensor, recons: torch.Tensor, g: int):
    """The peer: every pair scored on its own, both images encoded per pair and per backbone. Returns [B*G]."""
    out = []
    for i in range(recons.shape[0]):
        src, rec = sources[i // g : i // g + 1], recons[i : i + 1]
        total = 0.0
        for name, fx in backbones.items():
            a, b = F.normalize(fx(src).float(), dim=-1), F.normalize(fx(rec).float(), dim=-1)
            total += weights[name] * F.cosine_similarity(a, b).item()
        out.append(total)
    return torch.tensor(out)


def _inputs(b: int, g: int, src_hw: tuple[int, int], rec_size: int, device: str = "cpu"):
    gen = torch.Generator().manual_seed(0)
    sources = torch.rand(b, 3, *src_hw, generator=gen)
    recons = torch.rand(b * g, 3, rec_size, rec_size, generator=gen)
    return sources.to(device), recons.to(device)


def _variants(args, kind: str):
    from uae_fast.rewards import ReconstructionReward

    backbones = build_backbones(kind, args.depth, args.device)
    weights = {n: 1.0 / len(backbones) for n in backbones}
    reward = ReconstructionReward(backbones, weights, cache_size=4096)
    hw = (args.src_height, args.src_width)
    sources, recons = _inputs(args.batch, args.generations, hw, args.rec_size, args.device)
    ids = list(range(args.batch))

    def ours_cold():
        reward.clear_cache()
        return reward(sources, recons, source_ids=ids).rewards

    def ours_warm():
        return reward(sources, recons, source_ids=ids).rewards

    def per_pair():
        return per_pair_reward(backbones, weights, sources, recons, args.generations)

    variants = {"ours (cold cache)": ours_cold, "ours (warm cache)": ours_warm, "per-pair": per_pair}
    if args.device != "cuda":
        return variants

    def synced(fn):
        def run():
            out = fn()
            torch.cuda.synchronize()
            return out

        return run

    return {name: synced(fn) for name, fn in variants.items()}


def _child(args) -> None:
    torch.set_num_threads(args.threads)
    variants = _variants(args, args.kind)
    fn = variants[args.child]
    fn()  # warm-up (and fills the warm cache)
    if args.device == "cuda":
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        return child_report({"peak_mb": (torch.cuda.max_memory_allocated() - before) / 2**20})
    reset_peak_rss()
    before = peak_rss_mb()
    fn()
    child_report({"peak_mb": peak_rss_mb() - before})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="B=4, one repeat, no memory children (under a minute)")
    p.add_argument("--batch", type=int, default=16, help="B source images (default 16)")
    p.add_argument("--generations", type=int, default=8, help="G reconstructions per source (default 8)")
    p.add_argument("--rec-size", type=int, default=1024, help="reconstruction side (default 1024, SD3.5's output)")
    p.add_argument("--src-height", type=int, default=768, help="source height (default 768)")
    p.add_argument("--src-width", type=int, default=1024, help="source width (default 1024)")
    p.add_argument("--depth", type=int, default=2, help="blocks of the ViT-B-like backbone (default 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on shared cores)")
    p.add_argument("--kinds", nargs="+", default=["tiny", "vit-b"], choices=["tiny", "vit-b"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu (fp32) or cuda (bf16 backbones)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args)
    if args.quick:
        args.batch, args.repeats, args.rec_size, args.src_height, args.src_width = 4, 1, 512, 384, 512
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    rows = []
    n = args.batch * args.generations
    for kind in args.kinds:
        variants = _variants(args, kind)
        # Same numbers from both paths (rewards agree to float rounding), checked before timing.
        ours, peer = variants["ours (cold cache)"](), variants["per-pair"]()
        err = float((ours - peer).abs().max())
        start = time.perf_counter()
        times = interleaved_medians(variants, repeats=args.repeats, warmup=1)  # the same for every variant
        print(f"[{kind}] timed in {time.perf_counter() - start:.0f} s; max |reward diff| = {err:.2e}", file=sys.stderr)
        for name, t in times.items():
            peak = "–"
            if not args.quick:
                child_args = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in _PASS]
                res = measure_peak_in_child(__file__, [*child_args, f"--child={name}", f"--kind={kind}"])
                peak = f"{res['peak_mb']:.0f}"
            rows.append(
                {
                    "backbones": kind,
                    "variant": name,
                    "what it does": OURS.get(name, PEER),
                    "B x G": f"{args.batch} x {args.generations}",
                    "time (s)": f"{t:.3f}",
                    "images/s": f"{n / t:.1f}",
                    "peak MB": peak,
                    "speed-up vs per-pair": fmt_ratio(times["per-pair"], t),
                }
            )
    print(markdown_table(rows, list(rows[0])))
    where = "CUDA, bf16" if args.device == "cuda" else f"CPU, fp32, {args.threads} thread(s)"
    print(
        f"\n{where}; sources {args.src_height}x{args.src_width}, reconstructions {args.rec_size}^2; every variant: "
        f"1 warm-up call, then median of {args.repeats} interleaved rounds"
    )


_PASS = ("batch", "generations", "rec_size", "src_height", "src_width", "depth", "threads", "device")

if __name__ == "__main__":
    main()
