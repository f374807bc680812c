"""Stage 1's maths against diffusers' own SD3 training functions, the caption cache against no cache, the EMA against
its recurrence, and the image fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from uae_fast.dist.engines import Engine
from uae_fast.dist.runtime import Runtime
from uae_fast.train.caption_cache import ConditioningCache
from uae_fast.train.flow_matching import flow_matching_loss, loss_weights, noisy_latents, sample_sigmas
from uae_fast.train.pretrain import fit_image
from uae_fast.train.weights import EMA


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform"])
def test_sigmas_follow_diffusers_sd3_density_and_shift(scheme):
    """u from diffusers' own SD3 density; σ = the scheduler's shifted training σ at the timestep whose unshifted σ
    is u (up to the 1/1000 grid). NB diffusers' scripts index their descending schedule with ⌊1000·u⌋, which
    mirrors u (σ ≈ shift(1 − u)); we follow the SD3 paper, where u is the noise level itself."""
    shift, n = 3.0, 4000
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    u = compute_density_for_timestep_sampling(
        scheme, n, logit_mean=0.2, logit_std=0.9, mode_scale=1.29, generator=torch.Generator().manual_seed(3)
    )
    theirs = scheduler.sigmas[999 - (u * 1000).long().clamp(max=999)]  # unshifted σ of index i: (1000 − i) / 1000
    ours = sample_sigmas(
        n, scheme=scheme, shift=shift, logit_mean=0.2, logit_std=0.9, mode_scale=1.29,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert ((ours > 0) & (ours < 1)).all()
    if scheme == "logit_normal":  # torch.normal and randn draw differently: compare the distributions
        q = torch.linspace(0.02, 0.98, 25)
        torch.testing.assert_close(ours.quantile(q), theirs.quantile(q), atol=0.02, rtol=0)
    else:
        torch.testing.assert_close(ours, theirs, atol=3e-3, rtol=0)


@pytest.mark.parametrize("scheme", ["logit_normal", "sigma_sqrt", "cosmap", "mode"])
def test_loss_weights_are_diffusers_sd3_weights(scheme):
    sigmas = torch.linspace(0.05, 0.95, 19)
    torch.testing.assert_close(loss_weights(sigmas, scheme), compute_loss_weighting_for_sd3(scheme, sigmas).float())


def test_flow_matching_loss_is_the_weighted_velocity_error():
    g = torch.Generator().manual_seed(0)
    x0, eps, pred = (torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64) for _ in range(3))
    sigmas = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 0.5])
    expected = [float(w[i]) * float(((pred[i] - (eps[i] - x0[i])) ** 2).mean()) for i in range(3)]
    torch.testing.assert_close(
        flow_matching_loss(pred, x0, eps, w).double(), torch.tensor(expected, dtype=torch.float64)
    )
    xt = noisy_latents(x0, eps, sigmas)
    torch.testing.assert_close(xt[1], 0.5 * x0[1] + 0.5 * eps[1])
    torch.testing.assert_close(xt[2], 0.1 * x0[2] + 0.9 * eps[2])


def test_conditioning_cache_equals_recomputing_and_counts():
    calls = []

    def compute(captions):  # variable-length rows: caption i's length is its word count
        calls.append(list(captions))
        length = max(len(c.split()) for c in captions)
        seq = torch.zeros(len(captions), length, 2)
        mask = torch.zeros(len(captions), length, dtype=torch.bool)
        for i, c in enumerate(captions):
            n = len(c.split())
            seq[i, :n] = torch.arange(n, dtype=torch.float32)[:, None] + hash(c) % 7
            mask[i, :n] = True
        return seq, mask, torch.tensor([[float(len(c))] for c in captions])

    cache = ConditioningCache(compute, size=2, device="cpu")
    batch = ["a b c", "d", "a b c"]
    got = cache(batch)
    ref = compute(batch)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    assert calls[0] == ["a b c", "d"] and cache.misses == 2 and cache.hits == 1
    cache(["d", "e f"])  # "d" hit; "e f" evicts the least recently used "a b c"
    assert calls[-1] == ["e f"] and set(cache.rows) == {"d", "e f"}
    cache(["a b c"])
    assert calls[-1] == ["a b c"]
    no_cache = ConditioningCache(compute, size=0, device="cpu")
    no_cache(["d"]), no_cache(["d"])
    assert calls[-2:] == [["d"], ["d"]]


def test_ema_follows_its_recurrence():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ema = EMA({"p": p}, decay=0.9, engine=Engine(Runtime()))
    expected = p.detach().clone()
    for value in ([3.0, 0.0], [0.0, 1.0], [5.0, 5.0]):
        with torch.no_grad():
            p.copy_(torch.tensor(value))
        ema.update()
        expected = 0.9 * expected + 0.1 * torch.tensor(value)
    torch.testing.assert_close(ema.shadow["p"], expected)
    with ema.applied():
        torch.testing.assert_close(p.detach(), expected)
    torch.testing.assert_close(p.detach(), torch.tensor([5.0, 5.0]))


def test_fit_image_crops_the_centre_to_the_target_aspect():
    tall = np.zeros((40, 10, 3), np.uint8)
    tall[15:25] = 200  # the central square band survives a square crop, the black ends do not
    out = fit_image(tall, 8, 8)
    assert out.shape == (3, 8, 8)
    torch.testing.assert_close(out, torch.full((3, 8, 8), 200 / 255), atol=2e-2, rtol=0)
    wide = np.zeros((10, 40, 3), np.uint8)
    wide[:, 10:30] = 255
    out = fit_image(wide, 8, 16)  # 1:2 target keeps the middle 20 columns
    assert out.shape == (3, 8, 16) and math.isclose(float(out.mean()), 1.0, abs_tol=0.02)
