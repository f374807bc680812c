"""Stage 2b trainer and the unified schedule: rollouts that line up with their log-probs, CFG's negative branch out
of the graph, bad input, the SDE window, checkpoints, exact resume (also killed inside the 2b part of a unified
run) and the released layout of the result."""

from __future__ import annotations

import json
import math

import pytest
import torch

import uae_fast
from uae_fast.errors import CheckpointError, ConfigError
from uae_fast.rl.flow_grpo import transition_logprob
from uae_fast.train import U4GTrainer, UnifiedTrainer, load_train_config

FAST = ["report_images=0", "save_final_model=false", "tensorboard=false"]
# u4g_tiny trains one SDE step from a shared start (its learning recipe); these tests check the library's defaults:
# every step stochastic and trained, different noise per render.
LIBRARY_SAMPLING = ["u4g.sde_window_size=0", "u4g.sde_window_range=null", "u4g.same_noise=false"]


def make(tmp_path, *overrides, uae=None):
    base = [f"output_dir={tmp_path}", "u4g.batch_size=8", "u4g.num_generations=4", "u4g.num_steps=3", "max_steps=2",
            *LIBRARY_SAMPLING]  # fmt: skip
    return U4GTrainer(load_train_config("u4g_tiny", [*base, *FAST, *overrides]), uae=uae)


def _dit_lora(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.policy.peft_model.named_parameters() if p.requires_grad}


def _one_rollout(trainer):
    images = trainer.dataset.next_batch(trainer.config.u4g.captions_per_step)
    batch = trainer.rollout(images, trainer.caption(images))
    trainer.score(batch)
    return batch


def test_stored_transitions_reproduce_their_log_probs(tmp_path):
    """Each kept (x_j, x_j+1) pair, re-scored by the policy that sampled it, gives the stored log-prob: the
    trajectories, steps, conditioning and log-probs line up row by row (and the on-policy ratio is 1)."""
    trainer = make(tmp_path, "decoder.guidance=2.5")
    batch = _one_rollout(trainer)
    s, g = trainer.config.u4g, trainer.config.u4g.num_generations
    sigmas = trainer.policy.sigmas(s.num_steps)
    assert batch.latents.shape[:3] == (8, len(batch.steps), 2) and batch.steps == [0, 1, 2]
    with torch.no_grad():
        for k, j in enumerate(batch.steps):
            x, x_next = batch.latents[:, k, 0], batch.latents[:, k, 1]
            cond = tuple(t[torch.arange(8) // g] for t in batch.cond)
            velocity = trainer.policy.velocity(x, sigmas[j], cond)
            logp, _ = transition_logprob(velocity, x, x_next, sigmas[j], sigmas[j + 1], noise_level=s.noise_level,
                                         sde_type=s.sde_type)  # fmt: skip
            torch.testing.assert_close(logp, batch.log_probs[:, k], atol=2e-5, rtol=0)
        # consecutive trained steps chain: x_{j+1} of step j is x_j of step j + 1
        assert torch.equal(batch.latents[:, 0, 1], batch.latents[:, 1, 0])
    # renders of one caption come from different noise
    assert not torch.allclose(batch.renders[0], batch.renders[1])


def test_same_noise_starts_a_caption_s_renders_from_one_noise(tmp_path):
    batch = _one_rollout(make(tmp_path, "u4g.same_noise=true"))
    start = batch.latents[:, 0, 0]  # x_0 of every render (step 0 is trained)
    assert all(torch.equal(start[0], start[k]) for k in range(1, 4)) and not torch.equal(start[0], start[4])
    assert not torch.equal(batch.latents[0, 0, 1], batch.latents[1, 0, 1])  # the SDE noise still differs
    default = _one_rollout(make(tmp_path / "default")).latents[:, 0, 0]
    assert not torch.equal(default[0], default[1])


def test_cfg_negative_branch_is_not_in_the_graph(tmp_path):
    """Under autograd the guided velocity's gradient is guidance x the conditional branch's: uncond is detached."""
    trainer = make(tmp_path, "decoder.guidance=3.0")
    images = trainer.dataset.next_batch(1)
    cond = trainer.policy.condition(trainer.caption(images))
    x = trainer.policy.initial_noise([5])
    params = trainer.policy.trainable_parameters()
    torch.nn.init.normal_(params[1], std=0.1)  # LoRA B starts at 0: make the adapters matter
    sigma = trainer.policy.sigmas(3)[1]
    guided = torch.autograd.grad(trainer.policy.velocity(x, sigma, cond).square().sum(), params, allow_unused=True)
    with torch.no_grad():
        uncond = trainer.uae.decoder.velocity(x, sigma, *trainer.policy.negative)
    cond_v = trainer.uae.decoder.velocity(x, sigma, *cond)
    manual = (uncond + 3.0 * (cond_v - uncond)).square().sum()
    expected = torch.autograd.grad(manual, params, allow_unused=True)
    for a, b in zip(guided, expected):
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _sgd_update(trainer, batch) -> dict[str, torch.Tensor]:
    """Parameter change of one update with plain SGD (lr 1): minus the accumulated gradient."""
    trainer.optimizer = torch.optim.SGD(trainer.policy.trainable_parameters(), lr=1.0)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda _: 1.0)
    before = _dit_lora(trainer)
    trainer.update(batch)
    return {n: p - before[n] for n, p in _dit_lora(trainer).items()}


def test_update_reuses_the_rollout_s_negative_branch_exactly(tmp_path):
    """With CFG the update takes the rollout's negative-branch velocities (same weights, same states) instead of
    recomputing them: the gradient equals the one with every branch recomputed."""
    settings = ("decoder.guidance=3.0", "u4g.beta=0.05", "u4g.num_updates=2")
    reused_trainer, fresh_trainer = make(tmp_path / "a", *settings), make(tmp_path / "b", *settings)
    reused = _one_rollout(reused_trainer)
    fresh = _one_rollout(fresh_trainer)
    assert reused.uncond.shape == (8, 3, *reused.latents.shape[3:])
    torch.testing.assert_close(reused.latents, fresh.latents, rtol=0, atol=0)
    fresh.uncond = None
    a, b = _sgd_update(reused_trainer, reused), _sgd_update(fresh_trainer, fresh)
    assert any(v.abs().max() > 0 for v in a.values())
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-4)


def test_sde_window_and_timestep_fraction(tmp_path):
    trainer = make(tmp_path, "u4g.num_steps=10", "u4g.sde_window_size=2", "u4g.sde_window_range=[2,7]")
    starts = set()
    for step in range(30):
        trainer.step = step
        steps = trainer.trained_steps()
        assert len(steps) == 2 and steps[1] == steps[0] + 1 and 2 <= steps[0] <= 5
        starts.add(steps[0])
    assert len(starts) > 1  # the window moves from step to step
    assert make(tmp_path, "u4g.num_steps=10", "u4g.timestep_fraction=0.5").trained_steps() == [0, 1, 2, 3, 4]
    # cps's last step has no noise (σ' = 0): it is an Euler step, never trained
    assert make(tmp_path, "u4g.sde_type=cps", "u4g.noise_level=0.5").trained_steps() == [0, 1]


def test_window_rollout_is_ode_outside_the_window(tmp_path):
    trainer = make(tmp_path, "u4g.num_steps=4", "u4g.sde_window_size=1", "u4g.sde_window_range=[1,2]")
    batch = _one_rollout(trainer)
    assert batch.steps == [1] and batch.log_probs.shape == (8, 1)
    # renders of one caption differ only through their initial noise and the one SDE step
    assert torch.isfinite(batch.rewards).all()


def test_nan_latents_and_rewards_are_masked_and_counted(tmp_path):
    trainer = make(tmp_path)
    noise = trainer.policy.initial_noise

    def poisoned(seeds):
        x = noise(seeds)
        x[0] = float("nan")  # the first render of each decoder batch diverges
        return x

    trainer.policy.initial_noise = poisoned
    batch = _one_rollout(trainer)
    assert not batch.finite[0] and batch.finite[1:].all()
    assert math.isnan(batch.rewards[0]) and batch.advantages[0] == 0
    assert torch.isfinite(batch.renders).all()  # nothing non-finite reaches the reward model
    metrics = trainer.train_step()
    assert metrics["rollout/nonfinite"] == 1 and metrics["reward/invalid"] == 1
    assert math.isfinite(metrics["loss"]) and metrics["update/renders"] <= 7


def test_all_equal_rewards_skip_the_update(tmp_path):
    trainer = make(tmp_path)
    score = trainer.reward

    def constant(*args, **kwargs):
        out = score(*args, **kwargs)
        out.rewards.fill_(0.25)
        return out

    trainer.reward = constant
    before = _dit_lora(trainer)
    metrics = trainer.train_step()
    assert metrics["frac_reward_zero_std"] == 1.0 and metrics["update/renders"] == 0 and metrics["grad_norm"] == 0
    assert all(torch.equal(p, before[n]) for n, p in _dit_lora(trainer).items())
    assert trainer.scheduler.last_epoch == 1  # the schedule still advances as planned


def test_update_moves_only_the_dit_lora_and_advantages_are_clipped(tmp_path):
    trainer = make(tmp_path, "u4g.adv_clip_max=0.5")
    encoder = {n: p.detach().clone() for n, p in trainer.uae.encoder.named_parameters()}
    before = _dit_lora(trainer)
    batch = _one_rollout(trainer)
    assert batch.advantages.abs().max() <= 0.5 and batch.stats.advantages.abs().max() > 0.5
    trainer.update(batch)
    assert any(not torch.equal(p, before[n]) for n, p in _dit_lora(trainer).items())
    assert all(torch.equal(p, encoder[n]) for n, p in trainer.uae.encoder.named_parameters())


def test_greedy_captions_are_computed_once_per_image(tmp_path):
    trainer = make(tmp_path, "max_steps=6")
    calls = []
    caption = trainer.uae.captioner.caption

    def counted(images, *args, **kwargs):
        calls.append(len(images))
        return caption(images, *args, **kwargs)

    trainer.uae.captioner.caption = counted
    for _ in range(6):  # 12 draws over the 6 demo images: two epochs
        trainer.train_step()
    assert sum(calls) == len(trainer.dataset)


@pytest.mark.parametrize(
    "override, message",
    [
        ("u4g.noise_level=-1", "u4g.noise_level must be > 0"),
        ("u4g.num_steps=1", "u4g.num_steps must be >= 2"),
        ("u4g.sde_window_size=5", "u4g.sde_window_size must be in 0..3"),
        ("u4g.sde_window_range=[2,9]", "u4g.sde_window_range must be"),
        ("u4g.sde_type=ode", "u4g.sde_type must be one of"),
        ("u4g.timestep_fraction=0", "u4g.timestep_fraction must be in"),
        ("u4g.batch_size=6", "multiple of u4g.num_generations"),
        ("unified.schedule=random", "unified.schedule must be one of"),
    ],
)
def test_bad_settings_are_one_line_errors_at_load(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_train_config("u4g_tiny", [f"output_dir={tmp_path}", "u4g.num_steps=3", override])
    assert "\n" not in str(err.value)


def test_resume_is_exact(tmp_path, kill_at_step):
    """4 steps straight == 2 steps, a crash, then resume to 4: same DiT adapters, bit for bit (CPU, fp32)."""
    common = ["max_steps=4", "save_steps=2", "u4g.captions=sample", "u4g.beta=0.1"]
    straight = make(tmp_path / "a", *common)
    straight.train()
    interrupted = make(tmp_path / "b", *common)
    kill_at_step(interrupted, 2)
    resumed = make(tmp_path / "b", *common, "resume=auto")
    resumed.train()
    a, b = _dit_lora(straight), _dit_lora(resumed)
    assert resumed.step == 4 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def _unified(tmp_path, *overrides):
    base = [f"output_dir={tmp_path}", "batch_size=8", "num_generations=4", "decoder.steps=2", "u4g.batch_size=8",
            "u4g.num_generations=4", "u4g.num_steps=3", "max_steps=5", "unified.g4u_steps=2",
            "save_steps=1"]  # fmt: skip
    return UnifiedTrainer(load_train_config("unified_tiny", [*base, *FAST, *overrides]))


def test_unified_resume_killed_inside_stage_2b_is_exact(tmp_path, kill_at_step):
    straight = _unified(tmp_path / "a")
    straight.train()
    interrupted = _unified(tmp_path / "b")
    kill_at_step(interrupted, 3)  # steps 1-2 were stage 2a, step 3 stage 2b: die before step 4
    resumed = _unified(tmp_path / "b", "resume=auto")
    resumed.train()
    for name in ("llm_lora", "dit_lora"):
        a = dict(straight.adapters()[name].named_parameters())
        b = dict(resumed.adapters()[name].named_parameters())
        assert all(torch.equal(a[k], b[k]) for k in a if a[k].requires_grad), name
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage/u4g"] for r in rows] == [0, 0, 1, 1, 1]
    assert all(("g4u/reward" in r) != ("u4g/reward" in r) for r in rows)


def test_unified_alternates_and_its_result_loads_with_both_adapters(tmp_path):
    run = uae_fast.train(
        "unified_tiny",
        [f"output_dir={tmp_path}", "batch_size=8", "num_generations=4", "decoder.steps=2", "u4g.batch_size=8",
         "u4g.num_generations=4", "u4g.num_steps=3", "u4g.eval_num_steps=3", "max_steps=4",
         "unified.schedule=alternate", "report_images=1", "tensorboard=false"],
    )  # fmt: skip
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage/u4g"] for r in rows] == [0, 1, 0, 1]
    assert (run / "final" / "llm_lora").is_dir() and (run / "final" / "dit_lora").is_dir()
    assert (run / "report" / "index.html").exists()
    loaded = uae_fast.load(run / "final")
    assert loaded.encoder.lora_model is not None and loaded.decoder.lora_model is not None


def test_a_dit_lora_that_does_not_fit_is_a_clear_error(tmp_path):
    trainer = make(tmp_path, "u4g.lora_targets=[to_q,proj_out]")
    trainer.uae.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "dit_lora" / "adapter_config.json").read_text())
    config["target_modules"] = ["no_such_layer"]
    (tmp_path / "ckpt" / "dit_lora" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="dit_lora does not fit this DiT") as err:
        uae_fast.load(tmp_path / "ckpt")
    assert "\n" not in str(err.value)


def test_captions_longer_than_the_text_conditioning_are_counted(tmp_path):
    trainer = make(tmp_path, "decoder.conditioning=text")
    limit = trainer.uae.decoder.text_encoders.max_sequence_length
    tokenizer = trainer.uae.decoder.text_encoders.tokenizer_t5
    short, long = "a red bus", " ".join(["bus"] * (limit + 10))
    assert len(tokenizer(long).input_ids) > limit >= len(tokenizer(short).input_ids)
    assert trainer.policy.count_truncated([short, long, long]) == 2
    assert make(tmp_path / "llm").policy.count_truncated([long]) == 0  # llm conditioning takes any length
