"""Stage-2b Flow-GRPO step: our trainer (`uae_fast.train.U4GTrainer`) vs a step written the way flow_grpo's SD3
trainer (`scripts/train_sd3.py`) does it, on the same DiT, LoRA, inputs and seeds.

Model (`stage2b_setup.py`): a DiT of SD3.5-Medium's width (24 heads x 64 = 1536) with 2 blocks, 512 x 512 renders
(16 x 64 x 64 latents, 1024 image tokens), fixed captions of 256 tokens (~282 with the chat template; both paths
condition on the same ones: ours reads them from its caption cache, the peer from its prompt list), the tiny preset's
encoder LLM / projector / VAE, and the tiny DINOv2 reward against the source photo. One step = 1 caption x G=2
renders, 10 SDE steps (noise level 0.7), CFG 4.5 against UAE's negative prompt, LoRA r=32 alpha=64 on the attention
projections, beta 0.04 (the KL to the adapter-free DiT: flow_grpo's SD3 recipes and our default), clip range 1e-4,
AdamW lr 3e-4, one optimizer step per rollout batch (flow_grpo accumulates over micro-batches x timesteps).

Rows: `peer` (every step trained) against `ours` (every step trained: the same algorithm) and `ours-fast`
(`u4g.sde_window_size=2`: Flow-GRPO-Fast, 2 of the 10 steps stochastic and trained, the rest Euler).

The peer (`FlowGRPOPeer`), flow_grpo's loop with our model: the G copies of a prompt are conditioned one by one
(`uae.condition` on the repeated prompt list: the encoder's LLM pass + projector once per render), the negative prompt
once per run; the rollout runs cat([uncond, cond]) through the DiT at every step and keeps every latent and log-prob;
in training, for every step, the reference velocity under no_grad with the adapters disabled, then one forward on
cat([uncond, cond]) with grad for both branches, the CFG mix, `transition_logprob` and `flow_grpo_loss` (the same maths
as ours, so only the loop differs), backward per step. Its settings are its fastest here: fp32 on CPU, the same
threads, no_grad wherever flow_grpo uses it, the same micro-batch (all renders of the step) as ours.

Each variant runs in its own child process (CPU, --threads torch threads), all three at once in a token ring
(`stage2b_setup.run_round`): a child computes only while it holds the token and passes it on before every DiT forward,
so the variants' forwards interleave one by one and load from other users of the shared machine falls on all of them.
Times are net of the waits; peak RSS is per process, its counter reset once the child is built (baseline = models and
trainer loaded). Phases: caption/condition (ours: caption cache + `policy.condition`, once per caption; peer:
`uae.condition` per render), rollout (less the conditioning), score, update; other = the rest (data). Targets: ours
>= 1.5x images/s and <= 0.6x added peak vs the peer; ours-fast >= 3x images/s.

    python benchmarks/bench_stage2b.py            # 2 blocks, 512^2, 1 timed step per variant: ~25-30 min
    python benchmarks/bench_stage2b.py --quick    # 1 block, 256^2: ~4 min
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stage2b_setup import Clock, Ring, run_round  # noqa: E402
from utils import (  # noqa: E402
    child_report,
    current_rss_mb,
    fmt_ratio,
    markdown_table,
    peak_rss_mb,
    reset_peak_rss,
    summarise_child_runs,
)

__all__ = ["SETTINGS", "FlowGRPOPeer", "ours_config", "run_ours", "run_peer", "main"]

SETTINGS = {
    "num_generations": 2, "captions_per_step": 1, "num_steps": 10, "guidance": 4.5, "noise_level": 0.7,
    "sde_type": "sde", "beta": 0.04, "clip_range": 1e-4, "adv_clip_max": 5.0, "learning_rate": 3e-4,
    "max_grad_norm": 1.0, "lora_r": 32, "lora_alpha": 64,
}  # fmt: skip
# flow_grpo's SD3 LoRA targets (suffixes): the same modules as our DIT_ATTENTION_PROJECTIONS
PEER_LORA_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                     "attn.to_out.0", "attn.to_q", "attn.to_v"]  # fmt: skip
WINDOW = {"ours": 0, "ours-fast": 2}


def ours_config(model: str, size: int, output_dir: str, *, window: int = 0, seed: int = 0, **over):
    """The U4GTrainer config of a benchmark row (`over` replaces SETTINGS entries, e.g. for tests)."""
    from uae_fast.train import TrainConfig

    s = {**SETTINGS, **over}
    renders = s["num_generations"] * s["captions_per_step"]
    return TrainConfig.from_dict(
        {
            "stage": "u4g",
            "model": model,
            "output_dir": output_dir,
            "seed": seed,
            "device": "cpu",
            "data": {"images": "demo"},
            "decoder": {"size": size, "guidance": s["guidance"], "batch_size": renders},
            "reward": {"weights": {"dinov2": 1.0}, "backbones": {"dinov2": "tiny"}},
            "max_grad_norm": s["max_grad_norm"],
            "u4g": {
                "num_generations": s["num_generations"],
                "batch_size": renders,
                "num_steps": s["num_steps"],
                "sde_window_size": window,
                "noise_level": s["noise_level"],
                "sde_type": s["sde_type"],
                "beta": s["beta"],
                "clip_range": s["clip_range"],
                "adv_clip_max": s["adv_clip_max"],
                "learning_rate": s["learning_rate"],
                "lora": {"r": s["lora_r"], "alpha": s["lora_alpha"]},
            },
            "max_steps": 100,
            "tensorboard": False,
            "report_images": 0,
            "save_final_model": False,
        }
    )


class FlowGRPOPeer:
    """One Flow-GRPO step the way flow_grpo's `train_sd3.py` writes it, on a loaded UAE (module docstring).

    Args:
        uae: a loaded `uae_fast.api.UAE` (its DiT gets fresh LoRA adapters); captions: image key -> caption;
        config: the row's TrainConfig (`ours_config`): the same settings, data, seeds and reward as ours.
    """

    def __init__(self, uae, captions: dict[str, str], config):
        from peft import LoraConfig, get_peft_model

        from uae_fast.rewards.reconstruction import ReconstructionReward
        from uae_fast.train.data import ImageDataset

        self.uae, self.captions, self.config, self.s = uae, captions, config, config.u4g
        decoder = uae.decoder
        decoder.transformer.requires_grad_(False)
        lora = LoraConfig(r=self.s.lora.r, lora_alpha=self.s.lora.alpha, target_modules=PEER_LORA_TARGETS)
        decoder.transformer = get_peft_model(decoder.transformer, lora)
        self.params = [p for p in decoder.transformer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.s.learning_rate, betas=tuple(config.adam_betas),
                                           weight_decay=config.weight_decay)  # fmt: skip
        self.reward = ReconstructionReward.from_config(config.reward, device="cpu")
        self.dataset = ImageDataset(config.data, seed=config.seed)
        with torch.no_grad():
            self.negative = uae.negative_conditioning()  # flow_grpo: the negative prompt's embeddings, once
        self.step = 0
        self.clock = Clock()  # the benchmark's: phase times, and the ring's token passed before each DiT forward
        # flow_grpo differentiates both CFG branches; False detaches the uncond half after the same batched forward
        # (ours' gradient: tests compare against it; the cost is unchanged)
        self.uncond_grad = True

    def _cfg_inputs(self, cond: tuple, rows) -> tuple:
        """cat([negative repeated, cond[rows]]) -> (embeds, mask, pooled), padded to one length."""
        from uae_fast.models.decoder import pad_and_stack

        n = len(rows)
        ne, nm, npool = self.negative
        embeds, mask = pad_and_stack([ne.expand(n, -1, -1), cond[0][rows]], [nm.expand(n, -1), cond[1][rows]])
        return embeds, mask, torch.cat([npool.expand(n, -1), cond[2][rows]])

    def _guided(self, x, sigma, cfg_inputs) -> torch.Tensor:
        """One DiT forward on cat([x, x]) with cat([uncond, cond]), then the CFG mix."""
        self.clock.pause()
        uncond, cond = self.uae.decoder.velocity(torch.cat([x, x]), sigma, *cfg_inputs).chunk(2)
        uncond = uncond if self.uncond_grad else uncond.detach()
        return uncond + self.config.decoder.guidance * (cond - uncond)

    @torch.no_grad()
    def condition(self, images) -> tuple:
        """flow_grpo's compute_text_embeddings on the G-times repeated prompt list: one LLM pass per render."""
        g = self.s.num_generations
        return self.uae.condition([self.captions[im.key] for im in images for _ in range(g)])

    @torch.no_grad()
    def rollout(self, cond: tuple) -> dict:
        """Every step an SDE step with CFG (pipeline_with_logprob); every latent and log-prob kept."""
        from uae_fast.rl.flow_grpo import sde_step
        from uae_fast.train.seeds import stable_seed

        cfg, s, g = self.config, self.s, self.s.num_generations
        n = len(cond[0])
        sigmas = self.uae.decoder.sigmas(s.num_steps)
        seeds = [stable_seed(cfg.seed, self.step, i // g, i % g) for i in range(n)]  # ours' noise seeds
        latents, log_probs, renders = [], [], []
        for start in range(0, n, cfg.decoder.batch_size):
            rows = torch.arange(start, min(start + cfg.decoder.batch_size, n))
            # ours' SDE noise: one generator per render (what lets a distributed run draw as one process does)
            generator = [torch.Generator().manual_seed(stable_seed(cfg.seed, self.step, 13, i)) for i in rows.tolist()]
            x = self.uae.decoder.initial_noise([seeds[i] for i in rows], cfg.decoder.size, cfg.decoder.size).float()
            inputs = self._cfg_inputs(cond, rows)
            kept, logp = [x], []
            for j in range(s.num_steps):
                out = sde_step(self._guided(x, sigmas[j], inputs), x, sigmas[j], sigmas[j + 1],
                               noise_level=s.noise_level, sde_type=s.sde_type, generator=generator)  # fmt: skip
                x = out.prev_sample
                kept.append(x)
                logp.append(out.log_prob)
            latents.append(torch.stack(kept, 1))
            log_probs.append(torch.stack(logp, 1))
            renders.append(self.uae.decoder.decode_latents(x))
        return {"latents": torch.cat(latents), "log_probs": torch.cat(log_probs), "renders": torch.cat(renders)}

    @torch.no_grad()
    def score(self, images, renders) -> torch.Tensor:
        """Per-prompt advantages (flow_grpo's per-prompt stat tracking), clipped to ±adv_clip_max."""
        from uae_fast.rl.grpo import group_advantages

        g = self.s.num_generations
        out = self.reward([im.pixels for im in images], renders, source_ids=[im.key for im in images],
                          num_generations=g)  # fmt: skip
        rewards = out.with_nan()
        advantages = group_advantages(rewards, g, self.s.scale_rewards).advantages
        return advantages.clamp(-self.s.adv_clip_max, self.s.adv_clip_max)

    def update(self, cond: tuple, samples: dict, advantages: torch.Tensor, *, step: bool = True) -> dict:
        """Every step of every micro-batch: ref (no_grad, adapters off), forward on cat([uncond, cond]) with grad,
        PPO-clipped loss, backward; one optimizer step at the end (`step=False`: keep the gradients, for tests)."""
        from uae_fast.rl.flow_grpo import flow_grpo_loss, transition_logprob

        cfg, s = self.config, self.s
        n, steps = len(advantages), s.num_steps
        sigmas = self.uae.decoder.sigmas(steps)
        micro = [torch.arange(i, min(i + cfg.decoder.batch_size, n)) for i in range(0, n, cfg.decoder.batch_size)]
        losses, log_probs = [], []
        for rows in micro:
            inputs = self._cfg_inputs(cond, rows)
            for j in range(steps):
                x, x_next = samples["latents"][rows, j], samples["latents"][rows, j + 1]
                ref = None
                if s.beta > 0:
                    with torch.no_grad(), self.uae.decoder.transformer.disable_adapter():
                        ref = self._guided(x, sigmas[j], inputs)
                velocity = self._guided(x, sigmas[j], inputs)  # both branches with grad
                logp, kl = transition_logprob(velocity, x, x_next, sigmas[j], sigmas[j + 1], noise_level=s.noise_level,
                                              sde_type=s.sde_type, ref_velocity=ref)  # fmt: skip
                loss, _ = flow_grpo_loss(logp, samples["log_probs"][rows, j], advantages[rows],
                                         clip_range=s.clip_range, beta=s.beta, kl=kl)  # fmt: skip
                (loss * len(rows) / (n * steps)).backward()  # accelerate: mean over micro-batches x timesteps
                losses.append(float(loss.detach()) * len(rows) / (n * steps))
                log_probs.append(logp.detach())
        if step:
            limit = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            torch.nn.utils.clip_grad_norm_(self.params, limit)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return {"loss": sum(losses), "log_probs": log_probs}

    def train_step(self) -> dict[str, float]:
        """Condition -> rollout -> score -> update; returns the phase times."""
        wrap = self.clock.wrap
        self.clock.times = {}
        images = wrap(self.dataset.next_batch, "other")(self.s.captions_per_step)
        cond = wrap(self.condition, "condition")(images)
        samples = wrap(self.rollout, "rollout")(cond)
        advantages = wrap(self.score, "score")(images, samples["renders"])
        wrap(self.update, "update")(cond, samples, advantages)
        self.step += 1
        return self.clock.times


def _measure(step_fn, clock: Clock, args) -> dict:
    """Reset the peak-RSS counter, run the warm-up and timed steps (net of token waits), report."""
    reset_peak_rss()
    baseline = current_rss_mb()
    if clock.ring:
        clock.ring.start()
    steps = []
    for _ in range(args.warmup + args.steps):
        start, cpu, waited = time.perf_counter(), time.process_time(), clock.waited()
        phases = dict(step_fn())
        total = time.perf_counter() - start - (clock.waited() - waited)
        other = total - sum(v for k, v in phases.items() if k != "other")
        steps.append({"step": total, "cpu": time.process_time() - cpu, **phases, "other": other})
    peak = peak_rss_mb()
    if clock.ring:
        clock.ring.finish()
    return {"steps": steps[args.warmup :], "baseline_mb": baseline, "peak_mb": peak}


def run_ours(paths: dict, args, clock: Clock, window: int = 0) -> dict:
    """Our U4GTrainer row, as a user runs it (its train_step), timed per phase from outside."""
    from uae_fast.train import U4GTrainer

    captions = json.loads(open(paths["captions"]).read())
    with tempfile.TemporaryDirectory(prefix="bench_stage2b_ours_") as out:
        trainer = U4GTrainer(ours_config(paths["checkpoint"], paths["size"], out, window=window, seed=args.seed))
        trainer.captions.update(captions)  # its greedy-caption cache, as after the images' first epoch
        for phase in ("caption", "rollout", "score", "update"):
            setattr(trainer, phase, clock.wrap(getattr(trainer, phase), phase))
        trainer.policy.condition = clock.wrap(trainer.policy.condition, "condition")  # inside the rollout
        for forward in ("velocity", "rollout_velocity"):  # the DiT forwards of its rollout and update
            if hasattr(trainer.policy, forward):
                setattr(trainer.policy, forward, clock.before(getattr(trainer.policy, forward)))

        def step():
            clock.times = {}
            trainer.train_step()
            t = clock.times
            return {"condition": t["caption"] + t["condition"], "rollout": t["rollout"] - t["condition"],
                    "score": t["score"], "update": t["update"]}  # fmt: skip

        return _measure(step, clock, args)


def run_peer(paths: dict, args, clock: Clock) -> dict:
    """The flow_grpo-style row (same result layout as run_ours)."""
    import uae_fast

    captions = json.loads(open(paths["captions"]).read())
    with tempfile.TemporaryDirectory(prefix="bench_stage2b_peer_") as out:
        config = ours_config(paths["checkpoint"], paths["size"], out, seed=args.seed)
        torch.manual_seed(args.seed)
        peer = FlowGRPOPeer(uae_fast.load(paths["checkpoint"], device="cpu", seed=args.seed), captions, config)
        peer.clock = clock
        return _measure(peer.train_step, clock, args)


RUNNERS = {
    "peer": run_peer,
    "ours": lambda paths, args, clock: run_ours(paths, args, clock, WINDOW["ours"]),
    "ours-fast": lambda paths, args, clock: run_ours(paths, args, clock, WINDOW["ours-fast"]),
}
NAMES = {
    "peer": "flow_grpo-style step (every step trained)",
    "ours": "ours, every step trained",
    "ours-fast": f"ours, Fast window {WINDOW['ours-fast']}/{SETTINGS['num_steps']}",
}


def _row(name: str, s: dict, peer: dict | None) -> dict:
    n = SETTINGS["num_generations"] * SETTINGS["captions_per_step"]
    return {
        "variant": name,
        "images/s": f"{n / s['step']:.4f}",
        "step (s)": f"{s['step']:.1f}",
        "step CPU (s)": f"{s['cpu']:.1f}",
        "caption/condition (s)": f"{s['condition']:.2f}",
        "rollout (s)": f"{s['rollout']:.1f}",
        "score (s)": f"{s['score']:.2f}",
        "update (s)": f"{s['update']:.1f}",
        "other (s)": f"{s['other']:.2f}",
        "loaded RSS (MB)": f"{s['baseline']:.0f}",
        "peak +MB": f"{s['peak_add']:.0f}",
        "peak total (MB)": f"{s['peak_total']:.0f}",
        "images/s vs peer": fmt_ratio(peer["step"], s["step"]) if peer else "",
        "peak + vs peer": fmt_ratio(s["peak_add"], peer["peak_add"]) if peer else "",
        "peak total vs peer": fmt_ratio(s["peak_total"], peer["peak_total"]) if peer else "",
    }


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
    child_report(RUNNERS[args.child](json.loads(args.paths), args, Clock(ring)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 DiT block, 256^2 renders (a few minutes)")
    p.add_argument("--warmup", type=int, default=0, help="untimed steps per child (default 0: a step is minutes)")
    p.add_argument("--steps", type=int, default=1, help="timed steps per child (default 1)")
    p.add_argument("--rounds", type=int, default=1, help="rings of children, one after another (default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each child (default 2)")
    p.add_argument("--variants", nargs="+", default=list(RUNNERS), choices=list(RUNNERS))
    p.add_argument("--workdir", help="where the checkpoint and captions are built (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--paths", help=argparse.SUPPRESS)
    p.add_argument("--ring", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args)

    from stage2b_setup import prepare

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench_stage2b_")
    paths = prepare(args.workdir or tmp.name, quick=args.quick, seed=args.seed)
    passed = ["--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads)]
    passed += ["--seed", str(args.seed), "--paths", json.dumps(paths)]
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    for round_ in range(args.rounds):
        start = time.perf_counter()
        for variant, result in run_round(__file__, args.variants, passed).items():
            results[variant].append(result)
        print(f"[round {round_ + 1}] took {time.perf_counter() - start:.0f} s", file=sys.stderr)
    summary = {v: summarise_child_runs(r) for v, r in results.items() if r}
    peer = summary.get("peer")
    rows = [_row(NAMES[v], summary[v], peer if v != "peer" else None) for v in RUNNERS if v in summary]
    s, counts = SETTINGS, ", ".join(f"{v}: {x['n_steps']}" for v, x in summary.items())
    print(
        f"\nStage 2b, one step = {s['captions_per_step']} caption x G={s['num_generations']} renders of "
        f"{paths['size']}^2 (latents 16x{paths['size'] // 8}x{paths['size'] // 8}), DiT 1536 wide x {paths['layers']} "
        f"blocks, 256-token captions, {s['num_steps']} steps, CFG {s['guidance']}, beta {s['beta']}, LoRA r="
        f"{s['lora_r']}, {args.threads} threads, fp32 CPU; medians of {counts} timed steps\n"
    )
    if rows:
        print(markdown_table(rows, list(rows[0])))
    if peer:
        for v, target in (("ours", ">= 1.5x images/s, <= 0.6x peak +"), ("ours-fast", ">= 3x images/s")):
            if v in summary:
                x = summary[v]
                print(f"\n{NAMES[v]} vs peer: {fmt_ratio(peer['step'], x['step'])} images/s, "
                      f"{fmt_ratio(x['peak_add'], peer['peak_add'])} peak + (target {target})")  # fmt: skip
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
