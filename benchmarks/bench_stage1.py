"""Stage-1 training step (long-caption pretraining of the decoder): our trainer (`uae_fast.train.PretrainTrainer`,
its `train_step`, as `uae-fast train` runs it) vs a plain training loop written the way diffusers' SD3 training
scripts (`examples/dreambooth/train_dreambooth_lora_sd3.py`, `train_text_to_image`) write one, on the same model,
data, σ and noise.

Model and data (`stage2b_setup.py`, encoder `qwen3b`): a DiT of SD3.5-Medium's width (24 heads x 64 = 1536) with 2
blocks at 512 x 512 (16 x 64 x 64 latents, 1024 image tokens), an encoder LLM of Qwen2.5-VL-3B's text widths (hidden
2048, 16 heads, 2 KV heads, intermediate 11008) with 2 layers and UAE's projector (2048 -> 8192 -> 4096): 2 LLM layers
against 2 DiT blocks keep the conditioning's share of the step near the real 36 against 24. The tiny preset's VAE.
Data: the 4 demo photographs as 512 x 512 JPEGs, each with a fixed caption of 256 tokens (~282 with the chat
template) in `<key>.txt`, read by both through files. One step = 2 pairs; LoRA r=64 alpha=64 on the DiT's attention
projections (stage 1's default) + the projector trained, logit-normal σ (SD3), AdamW lr 1e-4, clipping at 1.0, fp32.

Rows:
- `peer` (`DiffusersStyleLoop`): a torch DataLoader whose dataset opens each file with PIL (exif transpose, RGB),
  Resize + CenterCrop + ToTensor + Normalize (torchvision), reads the caption file; every step the captions are
  templated with the HF processor's chat template, tokenized, run through the LLM (no_grad) and the projector, the VAE
  encodes (no_grad), then noise at σ, the DiT's velocity vs ε − x₀, backward, clipping, AdamW. Its fastest settings
  here: fp32 (CPU), the same torch threads, num_workers=0 (2 busy cores leave no core for a loader worker), no_grad
  around the frozen LLM and VAE, no gradient checkpointing, diffusers' `precondition_outputs` off (the velocity loss,
  as ours), σ drawn continuously rather than looked up in a 1000-entry table (the same draw as ours; no cost change).
- `ours`: the trainer's step with its caption-conditioning cache (default LRU of 4096 captions), warm: after one
  epoch every caption's LLM states are cached, and only the trained projector runs per step.
- `ours, no cache` (`pretrain.conditioning_cache=0`): the LLM runs on every caption every step, like the peer. This
  is what a real 700K-pair dataset gets each epoch: an LRU of 4096 captions (its rows are ~282 x 2048 floats, 2.3 MB
  each) cannot hold 700K captions across an epoch, so every caption misses. The `ours` row applies to datasets with
  at most `conditioning_cache` pairs (or steps that repeat captions).

Equal loss: the peer draws its batches in our dataset's seeded order and its latents, σ and noise from the
generator our step seeds, in our order, so step 1 sees the same pixels (the images are stored at 512^2: both
resizes are no-ops, and simplejpeg and Pillow decode the same pixels), σ and noise; the benchmark asserts that every
row's step-1 loss equals the peer's (relative 1e-4) and prints them.

Each variant runs in its own child process, all at once in a token ring (`stage2b_setup.run_round`): a child runs one
whole step while holding the token, so steps interleave one by one and load from other users of the shared machine
falls on all variants. The first epoch (2 steps) is warm-up; then `--steps` timed steps per round. Peak RSS is per
process, its counter reset once the child is built (baseline = models, trainer and data loaded). Phases: data
(files -> decoded pixels and captions), condition (caption -> prompt embeddings: LLM unless cached, projector),
encode (pixels -> VAE latents), update (DiT forward and backward, clipping, AdamW).

The update (the same DiT forward and backward in every row) dominates at the full shape: see the README for the
measured table and what the cache can and cannot save. `--quick` shrinks the DiT (1 block at 256^2) but not the LLM,
so its ratios overstate what the conditioning cache is worth.

    python benchmarks/bench_stage1.py --threads 1            # 2 DiT blocks, 512^2: ~10 min on 2 busy cores
    python benchmarks/bench_stage1.py --quick --threads 1    # 1 DiT block, 256^2: ~5 min
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stage2b_setup import Ring, run_round  # noqa: E402
from utils import (  # noqa: E402
    child_report,
    current_rss_mb,
    fmt_ratio,
    markdown_table,
    peak_rss_mb,
    reset_peak_rss,
    summarise_child_runs,
)

__all__ = ["SETTINGS", "SHAPES", "DiffusersStyleLoop", "ours_config", "run_ours", "run_peer", "summarise", "main"]

SETTINGS = {"batch_size": 2, "learning_rate": 1e-4, "lora_r": 64, "lora_alpha": 64, "max_grad_norm": 1.0}
SHAPES = {
    "full": {"name": "stage1-full", "layers": 2, "size": 512, "encoder": "qwen3b"},
    "quick": {"name": "stage1-quick", "layers": 1, "size": 256, "encoder": "qwen3b"},
    # tests only: a 128-wide DiT, the tiny encoder, 32-token captions
    "smoke": {"name": "stage1-smoke", "layers": 1, "size": 64, "encoder": "tiny", "heads": 2, "caption_tokens": 32},
}
PHASES = ("data", "condition", "encode", "update")
NAMES = {"peer": "diffusers-style loop", "ours": "ours (caption cache warm)", "ours-nocache": "ours, no cache"}
LOSS_RTOL = 1e-4


def ours_config(paths: dict, output_dir: str, *, cache: bool = True, seed: int = 0):
    """The PretrainTrainer config of a benchmark row (LoRA on the DiT + the projector; no evaluation)."""
    from uae_fast.train import TrainConfig

    s = SETTINGS
    return TrainConfig.from_dict(
        {
            "stage": "pretrain",
            "model": paths["checkpoint"],
            "output_dir": output_dir,
            "seed": seed,
            "device": "cpu",
            "data": {"images": paths["pairs"]},
            "decoder": {"size": paths["size"]},
            "reward": {"weights": {"dinov2": 1.0}, "backbones": {"dinov2": "tiny"}},
            "max_grad_norm": s["max_grad_norm"],
            "pretrain": {
                "batch_size": s["batch_size"],
                "learning_rate": s["learning_rate"],
                "finetune": "lora",
                "lora": {"r": s["lora_r"], "alpha": s["lora_alpha"]},
                "resolutions": [[0, paths["size"]]],
                "eval_images": 0,  # throughput only: no own-vs-shuffled evaluation at the first and last step
                **({} if cache else {"conditioning_cache": 0}),
            },
            "max_steps": 10_000,
            "tensorboard": False,
            "report_images": 0,
            "save_final_model": False,
        }
    )


# ---------------------------------------------------------------------- the peer
class _PairFolder(torch.utils.data.Dataset):
    """`<key>.jpg` + `<key>.txt` pairs: PIL decode and torchvision transforms per sample (diffusers' datasets)."""

    def __init__(self, folder: str, size: int):
        from torchvision import transforms

        self.files = sorted(p for p in Path(folder).iterdir() if p.suffix == ".jpg")
        self.transform = transforms.Compose(
            [
                transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR),
                transforms.CenterCrop(size),
                transforms.ToTensor(),
                transforms.Normalize([0.5], [0.5]),
            ]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image, ImageOps

        image = ImageOps.exif_transpose(Image.open(self.files[i]))
        if image.mode != "RGB":
            image = image.convert("RGB")
        caption = self.files[i].with_suffix(".txt").read_text(encoding="utf-8").strip()
        return {"pixel_values": self.transform(image), "caption": caption}


class _SeededEpochs(torch.utils.data.Sampler):
    """An endless index stream: epoch e is randperm(n) from seed·1000003 + e (our dataset's order, so both see the
    same batches)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    def __iter__(self):
        epoch = 0
        while True:
            yield from torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            epoch += 1


def _collate(rows: list[dict]) -> dict:
    return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]), "captions": [r["caption"] for r in rows]}


class DiffusersStyleLoop:
    """One stage-1 step the way diffusers' SD3 scripts write it, on a loaded UAE (module docstring).

    Args:
        uae: a loaded `uae_fast.api.UAE` (its DiT gets new LoRA adapters); pairs: the folder of JPEG + caption files;
        size: image side; seed: the data order and the per-step generator (ours' draws).
    """

    def __init__(self, uae, pairs: str, size: int, seed: int = 0):
        from diffusers.models.attention_processor import JointAttnProcessor2_0
        from peft import LoraConfig

        from uae_fast.train.settings import DIT_ATTENTION_PROJECTIONS

        s = SETTINGS
        self.uae, self.seed, self.step = uae, seed, 0
        self.llm, self.projector = uae.encoder.model, uae.encoder.projector
        self.vae, self.transformer = uae.decoder.vae, uae.decoder.transformer
        self.tokenizer = uae.processor.tokenizer
        self.tokenizer.padding_side = "right"
        for module in (self.llm, self.vae, self.transformer):
            module.requires_grad_(False)
        self.transformer.set_attn_processor(JointAttnProcessor2_0())  # diffusers' stock SD3 attention (no text mask)
        lora = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], target_modules=list(DIT_ATTENTION_PROJECTIONS))
        self.transformer.add_adapter(lora)  # diffusers' PEFT mixin, as its LoRA scripts
        self.projector.requires_grad_(True)
        self.params = [p for p in self.transformer.parameters() if p.requires_grad] + list(self.projector.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=s["learning_rate"], betas=(0.9, 0.999), weight_decay=0.0)
        dataset = _PairFolder(pairs, size)
        sampler = _SeededEpochs(len(dataset), seed)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=s["batch_size"], sampler=sampler, num_workers=0, collate_fn=_collate
        )
        self.batches = iter(loader)
        with torch.no_grad():
            self.pooled_empty = uae.decoder.pooled_empty  # SD3.5's pooled embedding of "", computed once
        shift = uae.decoder.scheduler.config.get("shift", 1.0)
        self.shift, self.num_train_timesteps = float(shift), uae.decoder.scheduler.config.num_train_timesteps

    def encode_prompt(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds [B, L, 4096] under autograd through the projector, pooled [B, P]); the LLM part no_grad.
        Padded to the longest caption and attended unmasked, as diffusers' SD3 scripts do (the benchmark's captions
        all have the same length)."""
        messages = [[{"role": "generate", "content": [{"type": "text", "text": c}]}] for c in captions]
        template = self.uae.processor.apply_chat_template
        texts = [template(m, tokenize=False, add_generation_prompt=True) for m in messages]
        tokens = self.tokenizer(texts, padding="longest", return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            hidden = self.llm(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, use_cache=False)
        embeds = self.projector(hidden.last_hidden_state)
        pooled = self.pooled_empty.expand(len(captions), -1)
        if self.uae.caption_pooled_weight:  # the tiny preset's departure (see presets/tiny.py); 0 for qwen3b
            mask = tokens.attention_mask[..., None].to(embeds.dtype)
            pooled = pooled + self.uae.caption_pooled_weight * (embeds * mask).sum(1) / mask.sum(1)
        return embeds, pooled

    def train_step(self) -> dict[str, float]:
        """One step; returns the loss and the phase times."""
        from uae_fast.train.seeds import stable_seed

        times, start = {}, time.perf_counter()
        batch = next(self.batches)
        times["data"], start = time.perf_counter() - start, time.perf_counter()
        generator = torch.Generator().manual_seed(stable_seed(self.seed, self.step, 1))  # ours' step generator
        with torch.no_grad():
            posterior = self.vae.encode(batch["pixel_values"]).latent_dist
            latents = posterior.sample(generator=generator)
            latents = (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        times["encode"] = time.perf_counter() - start
        n = len(latents)
        u = torch.sigmoid(torch.randn(n, generator=generator)).clamp(1e-5, 1 - 1e-5)  # logit-normal(0, 1)
        sigmas = self.shift * u / (1 + (self.shift - 1) * u)
        noise = torch.randn(latents.shape, generator=generator)
        start = time.perf_counter()
        embeds, pooled = self.encode_prompt(batch["captions"])
        times["condition"], start = time.perf_counter() - start, time.perf_counter()
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        prediction = self.transformer(hidden_states=noisy, timestep=sigmas * self.num_train_timesteps,
                                      encoder_hidden_states=embeds, pooled_projections=pooled,
                                      return_dict=False)[0]  # fmt: skip
        target = noise - latents
        loss = ((prediction.float() - target.float()) ** 2).reshape(n, -1).mean(1).mean()  # SD3 weights: 1
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, SETTINGS["max_grad_norm"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        times["update"] = time.perf_counter() - start
        self.step += 1
        return {"loss": float(loss.detach()), **times}


# ---------------------------------------------------------------------- the rows
def _measure(step_fn, ring: Ring | None, warmup: int, steps: int) -> dict:
    """Reset the peak-RSS counter, run the warm-up and timed steps (each while holding the ring's token), report."""
    reset_peak_rss()
    baseline = current_rss_mb()
    if ring:
        ring.start()
    records, losses = [], []
    for _ in range(warmup + steps):
        if ring:
            ring.pause()
        start, cpu = time.perf_counter(), time.process_time()
        out = step_fn()
        total = time.perf_counter() - start
        losses.append(out.pop("loss"))
        records.append({"step": total, "cpu": time.process_time() - cpu, **out})
    peak = peak_rss_mb()
    if ring:
        ring.finish()
    return {"steps": records[warmup:], "losses": losses, "baseline_mb": baseline, "peak_mb": peak}


def run_ours(paths: dict, *, cache: bool = True, warmup: int = 2, steps: int = 4, seed: int = 0, ring=None) -> dict:
    """Our PretrainTrainer row, as a user runs it (its train_step); the conditioning is timed from outside (it runs
    inside the trainer's `update` phase)."""
    from uae_fast.train import PretrainTrainer

    with tempfile.TemporaryDirectory(prefix="bench_stage1_ours_") as out:
        trainer = PretrainTrainer(ours_config(paths, out, cache=cache, seed=seed))
        condition, spent = trainer.condition, [0.0]

        def timed_condition(captions):
            start = time.perf_counter()
            try:
                return condition(captions)
            finally:
                spent[0] += time.perf_counter() - start

        trainer.condition = timed_condition

        def step():
            spent[0] = 0.0
            m = trainer.train_step()
            return {"loss": m["loss"], "data": m["time/data"], "encode": m["time/encode"], "condition": spent[0],
                    "update": m["time/update"] - spent[0], "cache_hits": m["conditioning/cache_hits"]}  # fmt: skip

        return _measure(step, ring, warmup, steps)


def run_peer(paths: dict, *, warmup: int = 2, steps: int = 4, seed: int = 0, ring=None) -> dict:
    """The diffusers-style row (same result layout as run_ours)."""
    import uae_fast

    peer = DiffusersStyleLoop(uae_fast.load(paths["checkpoint"], device="cpu"), paths["pairs"], paths["size"], seed)
    return _measure(peer.train_step, ring, warmup, steps)


RUNNERS = {
    "peer": run_peer,
    "ours": lambda paths, **kw: run_ours(paths, cache=True, **kw),
    "ours-nocache": lambda paths, **kw: run_ours(paths, cache=False, **kw),
}


def summarise(results: dict[str, list[dict]]) -> tuple[list[dict], dict]:
    """Child results per variant -> (table rows, summaries); asserts that every row's step-1 loss is the peer's."""
    summary = {v: summarise_child_runs(r) for v, r in results.items() if r}
    first = {v: r[0]["losses"][0] for v, r in results.items() if r}
    if "peer" in first:
        for v, loss in first.items():
            if abs(loss - first["peer"]) > LOSS_RTOL * max(abs(first["peer"]), 1e-8):
                raise AssertionError(f"step-1 loss of {v} is {loss!r}, the peer's {first['peer']!r}")
    peer, n = summary.get("peer"), SETTINGS["batch_size"]
    rows = []
    for v in RUNNERS:
        if v not in summary:
            continue
        s = summary[v]
        rows.append(
            {
                "variant": NAMES[v],
                "samples/s": f"{n / s['step']:.3f}",
                "step (s)": f"{s['step']:.2f}",
                **{f"{p} (s)": f"{s[p]:.3f}" for p in PHASES},
                "step-1 loss": f"{first[v]:.6f}",
                "loaded RSS (MB)": f"{s['baseline']:.0f}",
                "peak +MB": f"{s['peak_add']:.0f}",
                "peak total (MB)": f"{s['peak_total']:.0f}",
                "samples/s vs peer": fmt_ratio(peer["step"], s["step"]) if peer and v != "peer" else "",
            }
        )
    return rows, {**summary, "step1_loss": first}


def _child(args) -> None:
    import warnings

    import diffusers
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    transformers.logging.set_verbosity_error()
    diffusers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    ring = Ring(*map(int, args.ring.split(","))) if args.ring else None
    kw = {"warmup": args.warmup, "steps": args.steps, "seed": args.seed, "ring": ring}
    child_report(RUNNERS[args.child](json.loads(args.paths), **kw))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 DiT block, 256^2 (a couple of minutes)")
    p.add_argument("--shape", choices=list(SHAPES), help=argparse.SUPPRESS)  # tests: "smoke"
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per child (default 2: the first epoch)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per child and round (default 4: two epochs)")
    p.add_argument("--rounds", type=int, default=1, help="rings of children, one after another (default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each child (default 2)")
    p.add_argument("--variants", nargs="+", default=list(RUNNERS), choices=list(RUNNERS))
    p.add_argument("--workdir", help="where the checkpoint and pairs are built and reused (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--paths", help=argparse.SUPPRESS)
    p.add_argument("--ring", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args)

    from stage2b_setup import prepare

    shape = SHAPES[args.shape or ("quick" if args.quick else "full")]
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench_stage1_")
    paths = prepare(args.workdir or tmp.name, seed=args.seed, shape=shape)
    passed = ["--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads)]
    passed += ["--seed", str(args.seed), "--paths", json.dumps(paths)]
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    for round_ in range(args.rounds):
        start = time.perf_counter()
        for variant, result in run_round(__file__, args.variants, passed).items():
            results[variant].append(result)
        print(f"[round {round_ + 1}] took {time.perf_counter() - start:.0f} s", file=sys.stderr)
    rows, summary = summarise(results)
    counts = ", ".join(f"{v}: {summary[v]['n_steps']}" for v in results if results[v])
    tokens = paths.get("caption_tokens", 256)
    print(
        f"\nStage 1, one step = {SETTINGS['batch_size']} (image, caption) pairs at {paths['size']}^2 (latents 16x"
        f"{paths['size'] // 8}x{paths['size'] // 8}), DiT {64 * paths.get('heads', 24)} wide x {paths['layers']} "
        f"blocks, encoder LLM {paths.get('encoder', 'tiny')} x 2 layers, {tokens}-token captions, 4 pairs (an epoch "
        f"= 2 steps; the first is warm-up), LoRA r={SETTINGS['lora_r']} + projector, {args.threads} threads, fp32 CPU;"
        f" medians of {counts} timed steps\n"
    )
    print(markdown_table(rows, list(rows[0])))
    losses = ", ".join(f"{v} {x:.6f}" for v, x in summary["step1_loss"].items())
    print(f"\nstep-1 loss (same pixels, σ and noise): {losses} — equal within {LOSS_RTOL:g} relative")
    if "peer" in summary:
        for v in ("ours", "ours-nocache"):
            if v in summary:
                x, peer = summary[v], summary["peer"]
                print(f"{NAMES[v]} vs peer: {fmt_ratio(peer['step'], x['step'])} samples/s (target >= 1.5x)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
