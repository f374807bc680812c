"""ReconstructionReward: the formula against per-pair numpy, source-feature caching, NaN flagging, config errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uae_fast.errors import ConfigError
from uae_fast.rewards import (
    BACKBONE_NAMES,
    REWARD_FUNCTIONS,
    ReconstructionReward,
    RewardConfig,
    load_backbones,
    register_reward,
)

WEIGHTS = {"clip": 1.0, "dinov2": 0.5, "dinov3": 0.25, "longclip": 2.0}


@pytest.fixture(scope="module")
def backbones():
    return load_backbones({n: "tiny" for n in BACKBONE_NAMES}, device="cpu")


@pytest.fixture
def reward(backbones):
    return ReconstructionReward(backbones, WEIGHTS, cache_size=8)


def _group(b=2, g=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sources = [torch.rand(3, 60 + 10 * i, 80, generator=gen) for i in range(b)]  # different sizes, like photos
    return sources, torch.rand(b * g, 3, 64, 64, generator=gen)


def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_rewards_equal_per_pair_numpy_formula(reward, backbones):
    sources, recons = _group(b=2, g=3)
    out = reward(sources, recons, source_ids=["a", "b"])
    assert out.rewards.shape == out.valid.shape == (6,) and out.rewards.dtype == torch.float32
    assert out.valid.all() and out.num_invalid == 0
    for i in range(6):
        src, rec = sources[i // 3], recons[i : i + 1]
        per = {n: _cos(fx([src])[0], fx(rec)[0]) for n, fx in backbones.items()}  # each pair on its own
        assert out.rewards[i].item() == pytest.approx(sum(WEIGHTS[n] * per[n] for n in WEIGHTS), abs=1e-5)
        for n in WEIGHTS:
            assert out.per_backbone[n][i].item() == pytest.approx(per[n], abs=1e-5)


def test_identical_reconstruction_scores_sum_of_weights(reward):
    src = torch.rand(1, 3, 64, 64)
    out = reward(src, src.repeat(2, 1, 1, 1))
    torch.testing.assert_close(out.rewards, torch.full((2,), sum(WEIGHTS.values())), atol=1e-5, rtol=0)


def test_source_features_computed_once_per_id(reward):
    sources, recons = _group(b=2, g=4)
    reward(sources, recons, source_ids=[10, 11])
    assert reward.source_feature_calls == 2
    again = reward(sources, recons, source_ids=[10, 11])  # next step, same images: all from cache
    assert reward.source_feature_calls == 2
    reward(sources[:1], recons[:4], source_ids=[12])  # a new image is computed once
    assert reward.source_feature_calls == 3
    fresh = ReconstructionReward(reward.backbones, WEIGHTS)(sources, recons)  # no ids: no cache
    torch.testing.assert_close(again.rewards, fresh.rewards, atol=1e-6, rtol=0)


def test_micro_batch_size_does_not_change_rewards(backbones):
    sources, recons = _group(b=2, g=3)
    one = ReconstructionReward(backbones, WEIGHTS, micro_batch=1)(sources, recons)
    all_at_once = ReconstructionReward(backbones, WEIGHTS, micro_batch=64)(sources, recons)
    torch.testing.assert_close(one.rewards, all_at_once.rewards, atol=1e-5, rtol=0)


def test_cache_is_lru_bounded(backbones):
    reward = ReconstructionReward(backbones, {"clip": 1.0}, cache_size=2)
    sources, recons = _group(b=1, g=1)
    for key in ["x", "y", "x", "z"]:  # "y" is least recently used when "z" arrives
        reward(sources, recons, source_ids=[key])
    assert list(reward._cache) == ["x", "z"]
    assert reward.source_feature_calls == 3


def test_nan_reconstruction_and_failed_rows_are_flagged(reward):
    sources, recons = _group(b=2, g=3)
    recons[1] = float("nan")  # a decoder that blew up
    failed = torch.tensor([False, False, False, False, True, False])
    out = reward(sources, recons, source_ids=["p", "q"], failed=failed)
    assert out.valid.tolist() == [True, False, True, True, False, True]
    assert torch.isfinite(out.rewards).all() and out.rewards[1] == 0.0 and out.rewards[4] == 0.0
    assert all(torch.isfinite(v).all() for v in out.per_backbone.values())
    assert out.num_invalid == 2 and int(reward.total_invalid) == 2 and reward.total_samples == 6


def test_works_on_uae_generate_tensors(tiny, demo, backbones):
    """The training path: captions → generate_tensors → reward, all tensors, image-major groups."""
    g = 2
    captions = tiny.caption(demo[:2], num_generations=g, max_new_tokens=6)
    recons = tiny.generate_tensors(captions, steps=2, seed=[0, 0, 1, 1], allow_empty=True)
    reward = ReconstructionReward(backbones, {"dinov2": 1.0})
    out = reward(demo[:2], recons, source_ids=["astronaut", "chelsea"], num_generations=g)
    assert out.rewards.shape == (4,) and out.valid.all()
    assert ((out.rewards > -1) & (out.rewards <= 1)).all()


def test_shape_mismatch_is_a_clear_error(reward):
    sources, recons = _group(b=2, g=3)
    with pytest.raises(ConfigError, match="do not split into 2 sources x 4"):
        reward(sources, recons, num_generations=4)
    with pytest.raises(ConfigError, match="B\\*G, 3, H, W"):
        reward(sources, recons[:, :2])
    with pytest.raises(ConfigError, match="3 source ids for 2"):
        reward(sources, recons, source_ids=[1, 2, 3])


def test_config_validation():
    tiny = {n: "tiny" for n in BACKBONE_NAMES}
    assert RewardConfig(backbones=tiny).weights == {n: 0.25 for n in BACKBONE_NAMES}
    with pytest.raises(ConfigError, match="unknown backbone 'sigclip'"):
        RewardConfig(weights={"sigclip": 1.0}, backbones=tiny)
    with pytest.raises(ConfigError, match="all 0"):
        RewardConfig(weights={"clip": 0.0}, backbones=tiny)
    with pytest.raises(ConfigError, match="finite"):
        RewardConfig(weights={"clip": float("nan")}, backbones=tiny)
    with pytest.raises(ConfigError, match="no path for dinov3"):
        RewardConfig(weights={"clip": 1.0, "dinov3": 1.0}, backbones={"clip": "tiny"})
    with pytest.raises(ConfigError, match="micro_batch"):
        RewardConfig(backbones=tiny, micro_batch=0)
    with pytest.raises(ConfigError, match="function 'l2'"):
        RewardConfig(backbones=tiny, function="l2")


def test_from_config_and_registry():
    cfg = RewardConfig(weights={"clip": 2.0}, backbones={"clip": "tiny"})
    reward = ReconstructionReward.from_config(cfg, device="cpu")
    assert reward.names == ["clip"] and reward.weights.tolist() == [2.0]
    assert REWARD_FUNCTIONS["weighted_cosine"] is reward.reward_fn

    @register_reward("test_constant")
    def constant(src, rec, index, offsets, weights, failed=None, **kw):
        n = rec.shape[0]
        return torch.ones(n), torch.ones(n, weights.numel()), torch.ones(n, dtype=torch.bool)

    try:
        custom = ReconstructionReward(reward.backbones, {"clip": 1.0}, function="test_constant")
        sources, recons = _group(b=1, g=2)
        assert custom(sources, recons).rewards.tolist() == [1.0, 1.0]
        with pytest.raises(ConfigError, match="already registered"):
            register_reward("test_constant")(constant)
    finally:
        REWARD_FUNCTIONS.pop("test_constant")
