"""Group advantages (against TRL's formula), loss config validation, packing helpers, the loss wrapper."""

from __future__ import annotations

import math

import pytest
import torch

from uae_fast.errors import ConfigError
from uae_fast.rl.grpo import GRPOLossConfig, PackedCompletions, completion_logprobs, group_advantages, grpo_loss


def _trl_advantages(rewards, g, scale):
    """TRL 1.16's formula, via its own nanstd."""
    from trl.trainer.utils import nanstd

    grouped = rewards.view(-1, g)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(g)
    if scale == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        std = nanstd(grouped, dim=1).repeat_interleave(g)
    adv = rewards - mean
    return adv / (std + 1e-4) if scale != "none" else adv


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_trl(scale):
    rewards = torch.randn(6 * 4, generator=torch.Generator().manual_seed(0))
    ours = group_advantages(rewards, 4, scale)
    torch.testing.assert_close(ours.advantages, _trl_advantages(rewards, 4, scale), atol=1e-6, rtol=1e-6)
    assert ours.num_zero_std_groups == 0 and ours.frac_reward_zero_std == 0


def test_all_equal_group_gets_zero_and_is_counted():
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.1, 0.9, 0.3, 0.7])
    out = group_advantages(rewards, 4)
    assert torch.equal(out.advantages[:4], torch.zeros(4))
    assert out.num_zero_std_groups == 1 and out.frac_reward_zero_std == 0.5
    torch.testing.assert_close(out.advantages[4:], _trl_advantages(rewards, 4, "group")[4:])


def test_nan_and_inf_rewards_are_excluded_counted_and_never_propagate():
    rewards = torch.tensor([1.0, float("nan"), 3.0, 5.0, float("inf"), 2.0, 2.0, float("-inf")])
    out = group_advantages(rewards, 4)
    assert torch.isfinite(out.advantages).all()
    assert out.num_invalid_rewards == 3
    assert out.advantages[1] == 0 and out.advantages[4] == 0 and out.advantages[7] == 0
    valid = torch.tensor([1.0, 3.0, 5.0])  # the first group's statistics ignore the NaN
    expected = (valid - valid.mean()) / (valid.std() + 1e-4)
    torch.testing.assert_close(out.advantages[[0, 2, 3]], expected)
    assert out.num_zero_std_groups == 1  # second group: its two valid rewards are equal


def test_group_of_one_and_all_invalid_group():
    out = group_advantages(torch.tensor([0.3, 0.8]), 1)
    assert torch.equal(out.advantages, torch.zeros(2)) and out.num_zero_std_groups == 2
    out = group_advantages(torch.tensor([float("nan")] * 3), 3)
    assert torch.equal(out.advantages, torch.zeros(3)) and out.num_invalid_rewards == 3


@pytest.mark.parametrize(
    "rewards, g, message",
    [(torch.zeros(7), 4, "num_generations"), (torch.zeros(2, 4), 4, "B\\*G"), (torch.zeros(4), 0, "num_generations")],
)
def test_advantage_shape_errors(rewards, g, message):
    with pytest.raises(ConfigError, match=message):
        group_advantages(rewards, g)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss_type="ppo"), "loss_type"),
        (dict(scale_rewards="global"), "scale_rewards"),
        (dict(importance_sampling_level="seq"), "importance_sampling_level"),
        (dict(beta=-1), "beta"),
        (dict(epsilon=1.5), "epsilon"),
        (dict(temperature=0), "temperature"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_config_validation_names_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GRPOLossConfig(**kwargs)


def test_packed_from_padded_and_loss_wrapper():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (3, 4), generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]])
    old = torch.randn(3, 4, generator=g)
    batch = PackedCompletions.from_padded(ids, mask, old_logp=old, ref_logp=None)
    assert batch.num_sequences == 3 and batch.seq_index.tolist() == [0, 0, 0, 2, 2]
    assert torch.equal(batch.token_ids, ids[mask.bool()]) and torch.equal(batch.old_logp, old[mask.bool()])
    hidden = torch.randn(5, 8, generator=g, requires_grad=True)
    weight = torch.randn(50, 8, generator=g)
    config = GRPOLossConfig(loss_type="grpo", chunk_size=2)
    loss, logp, metrics = grpo_loss(hidden, weight, batch, torch.tensor([1.0, 0.0, -1.0]), config)
    assert math.isfinite(loss.item()) and set(metrics) >= {"entropy", "clip_ratio/region_mean"}
    ref_logp, ent = completion_logprobs(hidden, weight, batch.token_ids, config)
    torch.testing.assert_close(ref_logp, logp)
    assert not ref_logp.requires_grad and ent is None


# ---------------------------------------------------------------- tied groups: exactly 0, however they are written
def _fp64_advantages(rewards, g):
    """TRL's formula in fp64 on the same (fp32-rounded) rewards, NaN-free groups only."""
    r = rewards.double().view(-1, g)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_tied_groups_get_exactly_zero(dtype, scale):
    """0.3 x 8 summed in fp32 has a mean an ulp off (advantages ±3e-4 before): tied groups, with a NaN or not, and
    groups tied up to a few ulps of rounding, must give exactly 0.0 and be counted."""
    for g in (8, 3):
        tied = [[v] * g for v in (0.3, 0.1, 1 / 3, 0.7, 1234.567)] + [[0.3] * (g - 1) + [float("nan")]]
        rewards = torch.tensor([x for group in tied for x in group] + [0.1 * i for i in range(g)]).to(dtype)
        one_ulp = torch.nextafter(torch.tensor(0.7), torch.tensor(1.0)).item()  # rounding noise, not signal
        if dtype == torch.float32:
            rewards = torch.cat([rewards, torch.tensor([0.7] * (g - 1) + [one_ulp])])
        n_tied = rewards.numel() // g - 1
        out = group_advantages(rewards, g, scale)
        mixed = slice(len(tied) * g, (len(tied) + 1) * g)
        tied_adv = torch.cat([out.advantages[: mixed.start], out.advantages[mixed.stop :]])
        assert torch.equal(tied_adv, torch.zeros_like(tied_adv)), (g, tied_adv)
        assert out.num_zero_std_groups == n_tied and out.num_invalid_rewards == 1
        assert (out.group_std == 0).sum() == n_tied and out.advantages[mixed].abs().sum() > 0
        if scale == "group":
            torch.testing.assert_close(out.advantages[mixed], _fp64_advantages(rewards[mixed].float(), g).float())


@pytest.mark.parametrize("spread", [1e-3, 1e-5])
def test_tiny_real_spread_keeps_its_advantages(spread):
    group_of_8 = [0.3 * (1 + spread * i) for i in range(8)]
    rewards = torch.tensor(group_of_8 + [1 / 3 * (1 - spread * i * i) for i in range(3)])
    out = group_advantages(rewards, group_ids=torch.tensor([0] * 8 + [1] * 3))
    assert out.num_zero_std_groups == 0 and (out.advantages != 0).all()
    expected = torch.cat([_fp64_advantages(rewards[:8], 8), _fp64_advantages(rewards[8:], 3)])
    torch.testing.assert_close(out.advantages.double(), expected, rtol=1e-4, atol=1e-6)


def test_completion_logprobs_skips_entropy_by_default(monkeypatch):
    """The old-policy and reference passes throw the entropy away: by default no block computes it."""
    from uae_fast.kernels import linear_logprobs as kernel

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(7, 8, generator=g), torch.randn(60, 8, generator=g)
    ids = torch.randint(0, 60, (7,), generator=g)
    config = GRPOLossConfig(chunk_size=3, vocab_block=16, compute_entropy=True)
    flags = []
    real = kernel.online_softmax_block
    monkeypatch.setattr(kernel, "online_softmax_block", lambda *a: flags.append(a[-1]) or real(*a))
    logp, ent = completion_logprobs(hidden, weight, ids, config)
    assert ent is None and flags and not any(flags)
    flags.clear()
    logp_e, ent_e = completion_logprobs(hidden, weight, ids, config, entropy=True)
    assert all(flags) and torch.equal(logp, logp_e)
    logsm = torch.log_softmax(hidden.double() @ weight.double().t(), -1)
    torch.testing.assert_close(logp.double(), logsm.gather(1, ids[:, None]).squeeze(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_e.double(), -(logsm.exp() * logsm).sum(-1), atol=1e-5, rtol=0)


def test_completion_logprobs_names_an_out_of_range_token():
    hidden, weight = torch.randn(4, 8), torch.randn(60, 8)
    for bad in (60, -1):
        with pytest.raises(ConfigError, match=f"token id {bad} at position 2 .*60 entries"):
            completion_logprobs(hidden, weight, torch.tensor([1, 2, bad, 3]), GRPOLossConfig())
