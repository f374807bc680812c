"""The stage-2b benchmark's flow_grpo-style peer computes what U4GTrainer computes, so its speed comparison is like
for like: the same per-render conditioning, trajectories, log-probs and advantages from the same seeds, and on the
same trajectories the same training log-probs, KL and loss; the gradients equal ours when the peer's negative CFG
branch is detached as ours is, and differ (by that branch's term) when both branches are differentiated, as
flow_grpo does."""

from __future__ import annotations

import pytest
import torch

import uae_fast
from uae_fast.train import U4GTrainer


@pytest.fixture(scope="module")
def bench(benchmark_module):
    with benchmark_module("bench_stage2b") as module:
        yield module


def _lora(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def pair(bench, tmp_path):
    """Our trainer and the peer on two loads of the tiny UAE, with equal (non-zero) LoRA weights; 2 captions x G=2,
    3 steps all trained, CFG 2.5, beta 0.04, micro-batches of 2 renders, no gradient clipping."""
    over = {"num_steps": 3, "guidance": 2.5, "captions_per_step": 2, "max_grad_norm": 0.0}
    config = bench.ours_config("tiny", 64, str(tmp_path), **over)
    config.decoder.batch_size = 2
    trainer = U4GTrainer(config)
    peer = bench.FlowGRPOPeer(uae_fast.load("tiny", device="cpu"), {}, config)
    ours, theirs = _lora(trainer.policy.peft_model), _lora(peer.uae.decoder.transformer)
    assert ours.keys() == theirs.keys() and len(ours) > 0  # the same modules carry LoRA
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in ours.items():
            if "lora_B" in name:  # B starts at 0: make the adapters (and the KL to the reference) matter
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
            theirs[name].copy_(p)
    images = trainer.dataset.next_batch(2)
    assert [im.key for im in peer.dataset.next_batch(2)] == [im.key for im in images]  # same data order
    peer.captions = dict(zip([im.key for im in images], trainer.caption(images)))
    return trainer, peer, images


def test_peer_rollout_equals_ours(pair):
    """Per-render conditioning equals the per-caption one; same seeds give the same latents, log-probs, rewards."""
    trainer, peer, images = pair
    batch = trainer.rollout(images, trainer.caption(images))
    trainer.score(batch)
    g = trainer.config.u4g.num_generations
    cond = peer.condition(images)
    for mine, shared in zip(cond, batch.cond):
        torch.testing.assert_close(mine, shared[torch.arange(len(mine)) // g], atol=1e-6, rtol=0)
    samples = peer.rollout(cond)
    assert batch.steps == [0, 1, 2]
    torch.testing.assert_close(samples["latents"][:, :-1], batch.latents[:, :, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(samples["latents"][:, 1:], batch.latents[:, :, 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(samples["log_probs"], batch.log_probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(samples["renders"], batch.renders, atol=1e-5, rtol=0)
    torch.testing.assert_close(peer.score(images, samples["renders"]), batch.advantages, atol=1e-4, rtol=1e-4)


def test_peer_update_equals_ours_on_the_same_trajectories(pair):
    """On our stored trajectories: the peer's per-step log-probs are the rollout's (on-policy), its loss is ours,
    and its gradients are ours once its uncond branch is detached; flow_grpo's (both branches) differ."""
    trainer, peer, images = pair
    batch = trainer.rollout(images, trainer.caption(images))
    trainer.score(batch)
    assert bool((batch.advantages != 0).any())
    ours_params = _lora(trainer.policy.peft_model)
    captured = {}
    zero_grad = trainer.optimizer.zero_grad

    def capture_then_zero(*args, **kwargs):  # after the optimizer step, which leaves .grad as the update made it
        captured.update({n: p.grad.clone() for n, p in ours_params.items()})
        zero_grad(*args, **kwargs)

    trainer.optimizer.zero_grad = capture_then_zero
    metrics = trainer.update(batch)
    assert captured and metrics["kl"] > 0

    latents = torch.cat([batch.latents[:, :, 0], batch.latents[:, -1:, 1]], 1)  # x_0 .. x_3 of every render
    samples = {"latents": latents, "log_probs": batch.log_probs}
    cond = peer.condition(images)
    theirs = _lora(peer.uae.decoder.transformer)
    grads = {}
    for uncond_grad in (False, True):
        peer.uncond_grad = uncond_grad
        out = peer.update(cond, samples, batch.advantages, step=False)
        grads[uncond_grad] = {n: p.grad.clone() for n, p in theirs.items()}
        peer.optimizer.zero_grad(set_to_none=True)
        assert out["loss"] == pytest.approx(metrics["loss"], rel=1e-5, abs=1e-7)
        # micro-batches of 2 renders x 3 steps, in order: each the rollout's log-prob of its transition
        logp = torch.stack(out["log_probs"]).reshape(2, 3, 2).permute(0, 2, 1).reshape(4, 3)
        torch.testing.assert_close(logp, batch.log_probs, atol=2e-5, rtol=0)
    scale = max(g.abs().max() for g in captured.values())
    for name, grad in captured.items():
        torch.testing.assert_close(grads[False][name], grad, atol=1e-5 * scale, rtol=1e-4)
    differ = sum(not torch.allclose(grads[True][n], g, atol=1e-3 * scale, rtol=1e-2) for n, g in captured.items())
    assert differ > 0  # flow_grpo's gradient carries the uncond branch's (1 - guidance) term; ours does not
