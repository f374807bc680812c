"""The cold start: the loss's gradient (checkpointed = plain; a finite difference in float64), memory flat in the
number of sampler steps, the control's sign, bad input, checkpoints and exact resume, the released layout."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import uae_fast
from uae_fast.errors import ConfigError
from uae_fast.train import load_train_config
from uae_fast.train.cold_start import ColdStartTrainer

FAST = ["report_images=0", "save_final_model=false", "tensorboard=false", "cold_start.eval_images=0"]
CAPTIONS = ["a tabby cat on a red rug", "a rocket"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(tmp_path, *overrides, uae=None) -> ColdStartTrainer:
    base = [f"output_dir={tmp_path}", "cold_start.batch_size=2", "cold_start.num_steps=3", "cold_start.size=32"]
    return ColdStartTrainer(load_train_config("cold_start_tiny", [*base, "max_steps=2", *FAST, *overrides]), uae=uae)


def _perturb_lora(trainer, std=0.05) -> None:
    """LoRA's B starts at 0 (so A gets no gradient): give every adapter weight a value."""
    with torch.no_grad():
        for p in trainer.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype) * std)


def _loss_grads(trainer, images, *, checkpointed: bool) -> dict[str, torch.Tensor]:
    for p in trainer.trainable_parameters():
        p.grad = None
    (1 - trainer.similarity(images, CAPTIONS, [3, 4], checkpointed=checkpointed)).sum().backward()
    return {name: p.grad.clone() for name, model in trainer.adapters().items() for n, p in model.named_parameters()
            if p.requires_grad for name in [f"{name}/{n}"]}  # fmt: skip


def test_checkpointed_sampler_gives_the_plain_gradient_and_reaches_both_adapters(tmp_path):
    trainer = make(tmp_path)
    _perturb_lora(trainer)
    images = trainer.dataset.next_batch(2)
    plain = _loss_grads(trainer, images, checkpointed=False)
    checkpointed = _loss_grads(trainer, images, checkpointed=True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-6, atol=1e-9)
    # the gradient reaches the encoder's LoRA (through the caption's conditioning) and the DiT's
    llm = [g for n, g in plain.items() if n.startswith("llm_lora/")]
    dit = [g for n, g in plain.items() if n.startswith("dit_lora/")]
    assert llm and dit
    assert sum(float(g.abs().sum()) for g in llm) > 0 and sum(float(g.abs().sum()) for g in dit) > 0


def test_gradient_matches_a_float64_finite_difference(tmp_path):
    """The loss's slope along the gradient of one LLM LoRA matrix and one DiT LoRA matrix, by a central difference
    in float64, equals the gradient's norm. (ε = 1e-2: Qwen's RMSNorm computes in float32 even in a float64 model,
    so smaller steps measure its rounding; the truncation error at 1e-2 is ~1e-5 relative.)"""
    uae = uae_fast.load("tiny", dtype=torch.float64, device="cpu", seed=0)
    trainer = make(tmp_path, uae=uae)
    trainer.backbone.double()
    _perturb_lora(trainer)
    images = trainer.dataset.next_batch(2)

    def loss() -> float:
        with torch.no_grad():
            return float((1 - trainer.similarity(images, CAPTIONS, [3, 4], checkpointed=True)).sum())

    grads = _loss_grads(trainer, images, checkpointed=True)
    params = {f"{a}/{n}": p for a, m in trainer.adapters().items() for n, p in m.named_parameters() if p.requires_grad}
    for prefix in ("llm_lora/", "dit_lora/"):
        name = next(n for n in params if n.startswith(prefix) and "lora_A" in n)
        param, grad = params[name], grads[name]
        assert grad.dtype == torch.float64 and float(grad.norm()) > 1e-6, f"{name}: no gradient"
        direction, eps = grad / grad.norm(), 1e-2
        with torch.no_grad():
            param.add_(eps * direction)
            up = loss()
            param.sub_(2 * eps * direction)
            down = loss()
            param.add_(eps * direction)
        assert (up - down) / (2 * eps) == pytest.approx(float(grad.norm()), rel=2e-3), name


def _memory(fn) -> tuple[int, int]:
    """(peak, held at the end) bytes allocated through torch's CPU allocator while `fn` runs, from the profiler's
    memory events (each allocation and free, in order): what the autograd graph keeps is counted, nothing else."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())  # fmt: skip
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    del out
    return peak, live


def test_memory_is_flat_in_the_sampler_steps_with_checkpointing_and_grows_without(tmp_path):
    trainer = make(tmp_path, "cold_start.size=64")
    images = trainer.dataset.next_batch(2)
    peak, held = {}, {}
    for checkpointed in (True, False):
        for steps in (2, 10):
            trainer.config.cold_start.num_steps = steps

            def step():
                (1 - trainer.similarity(images, CAPTIONS, [3, 4], checkpointed=checkpointed)).sum().backward()

            # the larger of two profiles: once in a long suite run a profile came back short of allocation events
            peak[checkpointed, steps] = max(_memory(step)[0] for _ in range(2))
            for p in trainer.trainable_parameters():
                p.grad = None
            cond = trainer.condition(CAPTIONS)
            noise = trainer.uae.decoder.initial_noise([3, 4], 64, 64)
            held[checkpointed, steps] = _memory(lambda: trainer.sample(noise, cond, checkpointed=checkpointed))[1]
    # the whole forward + backward: within 1.5x (here ~1.01x) from 2 to 10 steps with checkpointing
    assert peak[True, 10] <= 1.5 * peak[True, 2]
    # without, every step's activations stay in the graph until the backward: the peak grows with the steps ...
    assert peak[False, 10] - peak[False, 2] > 10 * (peak[True, 10] - peak[True, 2])
    # ... by what the sampler's graph holds: ~0.47 MiB per step here, against ~13 KiB (its input latents) with it
    assert held[False, 10] > 4 * held[False, 2] and held[False, 10] > 20 * held[True, 10]


def test_negated_control_flips_the_update(tmp_path):
    grads = {}
    for negate in (False, True):
        trainer = make(tmp_path / str(negate), f"negate_advantages={str(negate).lower()}")
        _perturb_lora(trainer)
        images = trainer.dataset.next_batch(2)
        sims, loss = trainer.reconstruction_backward(images, CAPTIONS)
        grads[negate] = [p.grad.clone() for p in trainer.trainable_parameters()]
        assert loss == pytest.approx((1 if not negate else -1) * float((1 - sims).mean()), rel=1e-5)
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(b, -a)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("cold_start.num_steps=0", "cold_start.num_steps"),
        ("cold_start.size=30", "cold_start.size"),
        ("cold_start.learning_rate=0", "cold_start.learning_rate"),
        ("cold_start.batch_size=0", "cold_start.batch_size"),
        ("cold_start.captions=beam", "cold_start.captions"),
        ("cold_start.eval_images=-1", "cold_start.eval_images"),
        ("cold_start.backbone=dinov2", "cold_start.backbone"),
        ("cold_start.lora_targets=[]", "cold_start.lora_targets"),
        ("cold_start.lora_targets=[no_such_layer]", "cold_start.lora_targets"),
        ("cold_start.dit_lora.r=0", "lora.r"),
        ("decoder.conditioning=text", "cold_start.train_encoder"),
    ],
)
def test_bad_config_is_a_one_line_error_naming_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError) as info:
        make(tmp_path, override)
    message = str(info.value)
    assert key in message and "\n" not in message


def test_training_nothing_is_refused():
    with pytest.raises(ConfigError, match="cold_start.train_encoder or cold_start.train_decoder"):
        load_train_config("cold_start_tiny", ["cold_start.train_encoder=false", "cold_start.train_decoder=false"])


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {f"{a}/{n}": p.detach().clone() for a, m in trainer.adapters().items() for n, p in m.named_parameters()
            if p.requires_grad}  # fmt: skip


def test_killed_run_resumes_exactly_and_the_result_loads(tmp_path, kill_at_step):
    settings = ["max_steps=4", "save_steps=2", "cold_start.eval_images=2"]
    straight = make(tmp_path / "straight", *settings)
    straight.train()
    expected = _weights(straight)

    killed = make(tmp_path / "killed", *settings)
    kill_at_step(killed, 3)  # dies in step 4, after checkpoint-2
    resumed = make(tmp_path / "killed", *settings, "resume=auto")
    assert resumed.step == 0
    resumed.train()
    assert resumed.step == 4
    got = _weights(resumed)
    assert got.keys() == expected.keys() and any(k.startswith("llm_lora/") for k in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    folder = tmp_path / "killed" / "checkpoint-4"
    assert (folder / "llm_lora" / "adapter_config.json").exists() and (folder / "dit_lora").is_dir()


def test_run_writes_metrics_and_a_loadable_model(tmp_path):
    from uae_fast.train.metrics import read_metrics

    settings = [f"output_dir={tmp_path}", "max_steps=2", "cold_start.batch_size=2", "cold_start.num_steps=2",
                "cold_start.size=32", "cold_start.eval_images=2", "report_images=1", "tensorboard=false"]  # fmt: skip
    run_dir = uae_fast.train(load_train_config("cold_start_tiny", settings))
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert "eval/similarity" in rows[0] and "eval/similarity" in rows[-1]
    assert 0 < rows[0]["loss"] < 2 and rows[0]["reward"] == pytest.approx(1 - rows[0]["loss"], abs=1e-5)
    assert (run_dir / "report" / "index.html").exists()
    loaded = uae_fast.load(run_dir / "final")
    assert loaded.encoder.lora_model is not None and loaded.decoder.lora_model is not None
