"""Stage-2a GRPO step: our trainer (`uae_fast.train.G4UTrainer`) vs TRL's `GRPOTrainer`, same model, same reward.

Shapes (`--shapes`, each its own table): `stage2a`, the realistic-tiny UAE of `stage2a_setup.py` — Qwen's 151,936-entry
vocabulary, 448 x 448 images (256 image tokens), text hidden 128, small widths elsewhere; `qwen3b`, the same with
Qwen2.5-VL-3B's language-model widths (hidden 2048, 16 heads, 2 KV heads, intermediate 11008, 2 layers). One
optimizer step = 4 images x G=8 captions of at most --max-tokens new tokens,
temperature 0.7, LoRA r=32 alpha=64 on every linear layer of the language model, lr 1e-5, beta 0 (no reference
model), DAPO loss. The reward is the same function for both: captions -> our frozen decoder (64 px, 4 Euler steps,
no CFG, one noise seed per source image) -> DINOv2-feature cosine with the source (`ReconstructionReward`, tiny
backbone). Vision/chat special tokens are suppressed when sampling in both (a sampled <|image_pad|> breaks the next
forward).

TRL rows (GRPOConfig defaults otherwise): `trl` keeps TRL's default `gradient_checkpointing=True` (least memory: the
forward is recomputed in the backward); `trl-nockpt` turns it off (TRL's fastest). Both score only the completion
positions in TRL's fused LM head, as TRL does on CUDA. The ratio columns compare ours with TRL's *fastest* row for
samples/s and with TRL's *lowest* peak for memory (the strictest reading of each target), and the memory of each
TRL row is in the table. `trl-cpu` is TRL as shipped on a CPU, where that head projects every position (prompt +
256 image tokens) over the whole vocabulary — ~15x slower and ~5x the added peak memory here, so it is opt-in
(`--variants trl-cpu trl ours`) and never the peer. TRL's policy and the reward's frozen decoder (with its own copy
of the conditioning LLM) are separate models, as a TRL user would have them.

Each variant runs in a fresh child process (CPU, --threads torch threads): build the trainer, reset the peak-RSS
counter (baseline = models and trainer loaded), run --warmup steps, then --steps timed steps. Reported: samples/s =
32 / median step time, its CPU time (less sensitive to other load on shared cores, but it counts threads spinning),
per-phase medians, peak RSS above the baseline and in total, and ours/TRL ratios (targets:
>= 3x TRL's fastest samples/s, <= 0.5x its peak). `--device cuda`: bf16 models on the GPU for both (TRL with
`bf16=True`), a CUDA synchronise at each step's end, and the memory columns are CUDA allocator figures
(`torch.cuda.max_memory_allocated` above what the loaded trainer holds) instead of RSS. Children alternate TRL, ours,
TRL, ... for --rounds rounds; times are medians over all timed steps of all rounds, memory the median peak over
rounds.

Phases. Ours: the trainer's own "time/rollout", "time/reconstruct", "time/score", "time/update". TRL: timers
wrapped around `GRPOTrainer._generate` (prompt templating + image processing + `generate` + decoding: "generation"),
around the reward function (decoder: "reconstruct"; reward model: "score"), and around
`_generate_and_score_completions` (the rest of it — image processing for the loss forward, advantages — plus the
batch fetch (`get_batch_samples`) is "other"); "update" = optimizer-step wall time minus those (log-prob forward,
loss, backward over the gradient-accumulation micro-batches, optimizer).

    python benchmarks/bench_stage2a.py --shapes stage2a  # 32 new tokens, 1 warm-up + 4 timed steps, 2 rounds: ~15 min
    python benchmarks/bench_stage2a.py --quick           # both shapes, 16 new tokens, 1 warm-up + 2 timed steps
    python benchmarks/bench_stage2a.py --variants trl --workdir /tmp/uae_s2a   # one row, reuse the built inputs
    python benchmarks/bench_stage2a.py --quick --device cuda                  # on a GPU (bf16)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
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
    summarise_child_runs,
)

__all__ = ["DecoderReward", "run_trl", "run_ours", "main"]

BATCH, GENERATIONS = 4, 8  # source images per step, captions per image
TEMPERATURE, LEARNING_RATE, LORA_R, LORA_ALPHA = 0.7, 1e-5, 32, 64
DECODER = {"steps": 4, "size": 64, "guidance": 1.0}
# Every linear layer of the language model (Qwen2 blocks); the vision tower (`qkv`, `proj`, `fc1`/`fc2`... in
# `visual.*`), the projector and the LM head stay frozen. Matches `uae_fast`'s "all-linear on the LLM".
LM_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class DecoderReward:
    """captions -> frozen UAE decoder -> ReconstructionReward against the source image; accumulates phase times.

    Args:
        checkpoint: UAE checkpoint folder (its decoder and llm-conditioning encoder are used, frozen).
        dinov2: Folder of the DINOv2 reward backbone.
        seed: Base noise seed; the captions of source `i` all use noise seed `seed + i`.
        device: "cpu" or "cuda" (bf16 there, as `uae_fast.load` picks).
    """

    def __init__(self, checkpoint: str, dinov2: str, seed: int = 0, device: str = "cpu"):
        import uae_fast
        from uae_fast.rewards import ReconstructionReward, RewardConfig

        self.uae = uae_fast.load(checkpoint, device=device)
        self.reward = ReconstructionReward.from_config(
            RewardConfig(weights={"dinov2": 1.0}, backbones={"dinov2": dinov2}), device=device
        )
        self.seed = seed
        self.times = {"reconstruct": 0.0, "score": 0.0}

    def __call__(self, captions: list[str], sources: list, source_ids: list[int]) -> list[float]:
        """Rewards of N captions; `sources[i]` (PIL) is the image caption i describes, `source_ids[i]` its id."""
        start = time.perf_counter()
        images = self.uae.generate_tensors(
            captions, seed=[self.seed + i for i in source_ids], allow_empty=True, **DECODER
        )  # [N, 3, 64, 64]
        mid = time.perf_counter()
        # One "group" per caption: any order of captions works; source features are cached by id.
        out = self.reward(sources, images, source_ids=list(source_ids), num_generations=1)
        rewards = out.rewards.tolist()
        self.times["reconstruct"] += mid - start
        self.times["score"] += time.perf_counter() - mid
        return rewards

    def trl_reward_func(self):
        """The same reward as a TRL reward function: `(prompts, completions, **kwargs) -> list[float]`.

        TRL passes every dataset column except "prompt" as a keyword list with one entry per completion: here
        `image` (the PIL source) and `image_id`.
        """

        def reconstruction_reward(prompts, completions, image, image_id, **kwargs):
            captions = [c[0]["content"] if isinstance(c, list) else c for c in completions]
            return self([c.strip() for c in captions], image, image_id)

        return reconstruction_reward


def _load_images(folder: str) -> list:
    from PIL import Image

    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    return [Image.open(p).convert("RGB") for p in paths]


def _quiet() -> None:
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


class _Timed:
    """Wrap a bound method so every call adds its wall time to `times[name]`."""

    def __init__(self, fn, times: dict, name: str):
        self.fn, self.times, self.name = fn, times, name

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.times[self.name] = self.times.get(self.name, 0.0) + time.perf_counter() - start


class _Memory:
    """Baseline and peak of the child's memory: RSS on a CPU, the CUDA allocator's figures on a GPU (MB)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def reset(self) -> float:
        """Start counting the peak now; returns the baseline (what is held now)."""
        if not self.cuda:
            reset_peak_rss()
            return current_rss_mb()
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20

    def peak(self) -> float:
        if not self.cuda:
            return peak_rss_mb()
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20


def _trl_config(args, output_dir: str, checkpointing: bool):
    from trl import GRPOConfig

    micro = args.trl_micro_batch
    if (BATCH * GENERATIONS) % micro:
        raise SystemExit(f"--trl-micro-batch must divide {BATCH * GENERATIONS}")
    return GRPOConfig(
        output_dir=output_dir,
        use_cpu=args.device == "cpu",
        bf16=args.device == "cuda",
        gradient_checkpointing=checkpointing,  # TRL's default is True
        num_generations=GENERATIONS,
        per_device_train_batch_size=micro,  # completions per loss micro-batch
        gradient_accumulation_steps=BATCH * GENERATIONS // micro,  # -> 32 completions (4 images) per optimizer step
        max_completion_length=args.max_tokens,
        temperature=TEMPERATURE,
        beta=0.0,
        learning_rate=LEARNING_RATE,
        loss_type="dapo",
        max_steps=args.warmup + args.steps,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        log_completions=False,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        # Our sampler never emits vision/chat special tokens; give TRL's `generate` the same constraint.
        generation_kwargs={"suppress_tokens": args.suppress_tokens},
    )


def run_trl(paths: dict, args, compact: bool = True, checkpointing: bool = True) -> dict:
    """TRL's GRPOTrainer row: per-step total and phase times, plus memory figures.

    checkpointing: GRPOConfig.gradient_checkpointing (TRL's default True: less memory, a recomputed forward).

    compact: score only the completion positions in TRL's fused LM head, as TRL does on CUDA/XPU. As shipped, on a
        CPU TRL 1.16 projects *every* position (prompt and 256 image tokens included) through the 151,936-wide head
        (`add_fused_lm_head` keeps fixed tile shapes off Triton devices), ~20x the head work of this benchmark's
        completions. The switch flips TRL's one device test (`trl.trainer.utils._use_triton`) for that call only.
    """
    import torch
    import trl.trainer.utils as trl_utils
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, TrainerCallback
    from trl import GRPOTrainer

    from uae_fast.models.encoder import caption_messages, special_token_ids_to_suppress

    llm = Path(paths["checkpoint"]) / "llm"
    processor = AutoProcessor.from_pretrained(llm)
    processor.tokenizer.padding_side = "left"
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(llm, dtype=dtype)
    eos = list(model.generation_config.eos_token_id)
    args.suppress_tokens = special_token_ids_to_suppress(processor.tokenizer, keep=eos)
    reward = DecoderReward(paths["checkpoint"], paths["dinov2"], seed=args.seed, device=args.device)
    memory = _Memory(args.device)
    images = _load_images(paths["images"])[:BATCH]
    dataset = Dataset.from_list(
        [{"prompt": caption_messages(), "image": im, "image_id": i} for i, im in enumerate(images)]
    )
    times: dict[str, float] = {}
    steps: list[dict] = []

    class StepTimer(TrainerCallback):
        """One optimizer step = from the end of the previous one (so the batch fetch, done before TRL's
        `on_step_begin`, is counted) to this one's `on_step_end`."""

        def _restart(self):
            times.clear()
            reward.times.update(reconstruct=0.0, score=0.0)
            self.start, self.cpu = time.perf_counter(), time.process_time()

        def on_train_begin(self, *_, **__):
            self._restart()

        def on_step_end(self, *_, **__):
            memory.sync()
            total = time.perf_counter() - self.start
            prep, data = times.get("generate_and_score", 0.0), times.get("data", 0.0)
            gen = times.get("generation", 0.0)
            rec, score = reward.times["reconstruct"], reward.times["score"]
            steps.append(
                {
                    "step": total,
                    "cpu": time.process_time() - self.cpu,
                    "generation": gen,
                    "reconstruct": rec,
                    "score": score,
                    "other": prep - gen - rec - score + data,
                    "update": total - prep - data,
                }
            )
            self._restart()

    with tempfile.TemporaryDirectory(prefix="bench_stage2a_trl_") as out:
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward.trl_reward_func(),
            args=_trl_config(args, out, checkpointing),
            train_dataset=dataset,
            processing_class=processor,
            peft_config=LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=LM_LINEAR),
            callbacks=[StepTimer()],
        )
        trainer.get_batch_samples = _Timed(trainer.get_batch_samples, times, "data")
        trainer._generate = _Timed(trainer._generate, times, "generation")
        trainer._generate_and_score_completions = _Timed(
            trainer._generate_and_score_completions, times, "generate_and_score"
        )
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        if compact:
            trl_utils._use_triton = lambda device: True  # read only for the compact flag in TRL's fused head
        baseline = memory.reset()
        trainer.train()
        peak = memory.peak()
    return {"steps": steps[args.warmup :], "baseline_mb": baseline, "peak_mb": peak, "trainable": trainable}


def _ours_config(paths: dict, args, output_dir: str):
    """TrainConfig for 4 images x G=8 per step (`batch_size` counts completions, as TRL's)."""
    from uae_fast.train import TrainConfig

    return TrainConfig.from_dict(
        {
            "model": paths["checkpoint"],
            "output_dir": output_dir,
            "seed": args.seed,
            "device": args.device,
            "data": {"images": paths["images"]},
            "batch_size": BATCH * GENERATIONS,
            "num_generations": GENERATIONS,
            "max_completion_length": args.max_tokens,
            "temperature": TEMPERATURE,
            "decoder": dict(DECODER, fixed_noise=True),  # one noise seed per source image, as the TRL reward
            "reward": {"weights": {"dinov2": 1.0}, "backbones": {"dinov2": paths["dinov2"]}},
            "lora": {"r": LORA_R, "alpha": LORA_ALPHA},
            "learning_rate": LEARNING_RATE,
            "max_steps": args.warmup + args.steps,
            "tensorboard": False,
            "report_images": 0,
            "save_final_model": False,
        }
    )


def run_ours(paths: dict, args) -> dict:
    """Our G4UTrainer row (same result layout as run_trl)."""
    from uae_fast.train import G4UTrainer

    with tempfile.TemporaryDirectory(prefix="bench_stage2a_ours_") as out:
        trainer = G4UTrainer(_ours_config(paths, args, out))
        memory = _Memory(args.device)
        baseline = memory.reset()
        steps = []
        for _ in range(args.warmup + args.steps):
            start, cpu = time.perf_counter(), time.process_time()
            metrics = trainer.train_step()
            memory.sync()
            total, cpu = time.perf_counter() - start, time.process_time() - cpu
            phases = {
                "generation": metrics.get("time/rollout", float("nan")),
                "reconstruct": metrics.get("time/reconstruct", float("nan")),
                "score": metrics.get("time/score", float("nan")),
                "update": metrics.get("time/update", float("nan")),
            }
            steps.append({"step": total, "cpu": cpu, **phases, "other": total - sum(phases.values())})
        peak = memory.peak()
    return {"steps": steps[args.warmup :], "baseline_mb": baseline, "peak_mb": peak}


RUNNERS = {
    "trl": run_trl,
    "trl-nockpt": lambda paths, args: run_trl(paths, args, checkpointing=False),
    "trl-cpu": lambda paths, args: run_trl(paths, args, compact=False),
    "ours": run_ours,
}
NAMES = {
    "trl": "TRL GRPOTrainer (default: gradient checkpointing on)",
    "trl-nockpt": "TRL GRPOTrainer (gradient checkpointing off)",
    "trl-cpu": "TRL GRPOTrainer (as shipped on CPU: full-sequence head, checkpointing on)",
    "ours": "ours (G4UTrainer)",
}
PEERS = ("trl", "trl-nockpt")  # the rows the ratio columns compare with (trl-cpu only when neither ran)


def _child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    _quiet()
    child_report(RUNNERS[args.child](json.loads(args.paths), args))


def _row(name: str, s: dict, fastest: dict | None, lowest: dict | None, cuda: bool = False) -> dict:
    """One table row; `fastest` / `lowest`: TRL's summaries with the shortest step / the smallest added peak."""
    n = BATCH * GENERATIONS
    mem = "CUDA" if cuda else "RSS"
    return {
        "variant": name,
        "samples/s": f"{n / s['step']:.2f}",
        "step (s)": f"{s['step']:.2f}",
        "step CPU (s)": f"{s['cpu']:.1f}",
        "generation (s)": f"{s['generation']:.2f}",
        "reconstruct (s)": f"{s['reconstruct']:.2f}",
        "score (s)": f"{s['score']:.2f}",
        "update (s)": f"{s['update']:.2f}",
        "other (s)": f"{s['other']:.2f}",
        f"loaded {mem} (MB)": f"{s['baseline']:.0f}",
        "peak +MB": f"{s['peak_add']:.0f}",
        "peak total (MB)": f"{s['peak_total']:.0f}",
        "samples/s vs TRL fastest": fmt_ratio(fastest["step"], s["step"]) if fastest else "",
        "peak + vs TRL lowest": fmt_ratio(s["peak_add"], lowest["peak_add"]) if lowest else "",
        "peak total vs TRL lowest": fmt_ratio(s["peak_total"], lowest["peak_total"]) if lowest else "",
    }


def compare(summary: dict) -> tuple[dict | None, dict | None]:
    """TRL's fastest summary (shortest step) and its lowest-memory one (smallest added peak) among the peer rows."""
    peers = [summary[v] for v in PEERS if v in summary] or [summary[v] for v in ("trl-cpu",) if v in summary]
    if not peers:
        return None, None
    return min(peers, key=lambda s: s["step"]), min(peers, key=lambda s: s["peak_add"])


def targets_line(summary: dict) -> str:
    """'targets: ...' with the measured ratios and whether each target (>= 3x speed, <= 0.5x peak) is met."""
    fastest, lowest = compare(summary)
    if "ours" not in summary or fastest is None:
        return "targets: not evaluated (needs ours and a TRL row)"
    speed = fastest["step"] / summary["ours"]["step"]
    peak = summary["ours"]["peak_add"] / lowest["peak_add"] if lowest["peak_add"] > 0 else float("inf")
    return (
        f"targets: samples/s {speed:.2f}x TRL's fastest (>= 3x: {'met' if speed >= 3 else 'MISSED'}); "
        f"added peak {peak:.2f}x TRL's lowest (<= 0.5x: {'met' if peak <= 0.5 else 'MISSED'})"
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="16 new tokens, 2 timed steps, 1 round (a few minutes)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_completion_length for both (default 32)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per child (default 1)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per child (default 4)")
    p.add_argument("--rounds", type=int, default=2, help="children per variant, alternating (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each child (default 2)")
    p.add_argument("--trl-micro-batch", type=int, default=8, help="TRL per_device_train_batch_size (default 8)")
    p.add_argument("--variants", nargs="+", default=["trl-nockpt", "trl", "ours"], choices=list(RUNNERS))
    p.add_argument("--shapes", nargs="+", default=["stage2a", "qwen3b"], choices=["stage2a", "qwen3b"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu (fp32) or cuda (bf16)")
    p.add_argument("--workdir", help="where the checkpoint/images/backbone are built (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--paths", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.max_tokens, args.steps, args.rounds = 16, 2, 1
    if args.child:
        return _child(args)

    from stage2a_setup import prepare

    _quiet()
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench_stage2a_")
    for shape in args.shapes:
        start = time.perf_counter()
        paths = prepare(args.workdir or tmp.name, seed=args.seed, shape=shape)
        print(f"[{shape}] inputs ready in {time.perf_counter() - start:.0f} s: {paths['checkpoint']}", file=sys.stderr)
        print(run_shape(shape, paths, args), flush=True)
    if tmp is not None:
        tmp.cleanup()


def run_shape(shape: str, paths: dict, args) -> str:
    """Run every variant's children for one shape; returns the titled markdown table and the targets line."""
    passed = ["--max-tokens", str(args.max_tokens), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    passed += ["--threads", str(args.threads), "--trl-micro-batch", str(args.trl_micro_batch)]
    passed += ["--seed", str(args.seed), "--device", args.device, "--paths", json.dumps(paths)]
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    for round_ in range(args.rounds):
        for variant in args.variants:
            start = time.perf_counter()
            results[variant].append(measure_peak_in_child(__file__, [*passed, "--child", variant]))
            took = time.perf_counter() - start
            print(f"[{shape} round {round_ + 1}] {variant}: child took {took:.0f} s", file=sys.stderr)
    summary = {v: summarise_child_runs(r) for v, r in results.items() if r}
    fastest, lowest = compare(summary)
    cuda = args.device == "cuda"
    rows = [
        _row(NAMES[v], summary[v], *((fastest, lowest) if v == "ours" else (None, None)), cuda=cuda)
        for v in RUNNERS
        if v in summary
    ]
    counts = ", ".join(f"{v}: {s['n_steps']}" for v, s in summary.items())
    where = "CUDA, bf16" if cuda else f"CPU, fp32, {args.threads} threads"
    title = (
        f"### Stage 2a, shape `{shape}` ({SHAPE_TEXT[shape]}): one optimizer step = {BATCH} images x G={GENERATIONS}, "
        f"max {args.max_tokens} new tokens, 448x448 images, decoder {DECODER['size']}px/{DECODER['steps']} steps, "
        f"{where}; medians of {counts} timed steps"
    )
    return "\n".join(
        [title, "", markdown_table(rows, list(rows[0])) if rows else "(no rows)", "", targets_line(summary), ""]
    )


SHAPE_TEXT = {
    "stage2a": "vocab 151,936, text hidden 128, 2 layers",
    "qwen3b": "Qwen2.5-VL-3B text widths: vocab 151,936, hidden 2048, 16 heads, 2 KV heads, MLP 11008, 2 layers",
}


if __name__ == "__main__":
    main()
