"""Fused reward kernel (Triton interpreter) vs reward_ref vs a hand-written numpy formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uae_fast.kernels.reward import fused_reward, reward_ref


def _numpy_reward(src, rec, index, dims, weights, fill=0.0):
    """The formula written out independently: per backbone, cosine of L2-normalised rows, weighted sum."""
    src, rec = np.asarray(src, np.float64), np.asarray(rec, np.float64)
    bounds = np.concatenate([[0], np.cumsum(dims)])
    rewards, cos, valid = [], [], []
    for n in range(rec.shape[0]):
        row, ok = [], True
        for k in range(len(dims)):
            a = src[index[n], bounds[k] : bounds[k + 1]]
            b = rec[n, bounds[k] : bounds[k + 1]]
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                ok = False
                row.append(0.0)
                continue
            row.append(a @ b / (max(np.linalg.norm(a), 1e-12) * max(np.linalg.norm(b), 1e-12)))
        r = float(np.dot(weights, row))
        rewards.append(r if ok else fill)
        cos.append(row if ok else [fill] * len(dims))
        valid.append(ok)
    return np.array(rewards), np.array(cos), np.array(valid)


def _case(s, g, dims, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d = sum(dims)
    src = torch.randn(s, d, generator=gen).to(dtype)
    rec = torch.randn(s * g, d, generator=gen).to(dtype)
    index = torch.arange(s * g) // g
    offsets = torch.tensor([0, *np.cumsum(dims).tolist()])
    weights = torch.rand(len(dims), generator=gen) + 0.1
    return src, rec, index, offsets, weights


def test_formula_on_hand_made_features():
    # One 2-d backbone (w=1) and one 3-d backbone (w=0.5); reconstructions at known angles to the source.
    src = torch.tensor([[1.0, 0.0, 0.0, 0.0, 2.0]])
    rec = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0, 5.0],  # both identical in direction: 1 + 0.5 * 1
            [0.0, 3.0, 0.0, 1.0, 0.0],  # both orthogonal: 0
            [1.0, 1.0, 0.0, 0.0, -1.0],  # cos 45° = 0.7071, opposite = -1: 0.7071 - 0.5
            [0.0, 0.0, 0.0, 0.0, 0.0],  # zero vectors: cosine 0 by the eps convention, not NaN
        ]
    )
    rewards, cos, valid = reward_ref(
        src, rec, torch.zeros(4, dtype=torch.long), torch.tensor([0, 2, 5]), torch.tensor([1.0, 0.5])
    )
    torch.testing.assert_close(rewards, torch.tensor([1.5, 0.0, 2**-0.5 - 0.5, 0.0]))
    torch.testing.assert_close(cos[2], torch.tensor([2**-0.5, -1.0]))
    assert valid.all()


@pytest.mark.parametrize("s,g,dims", [(3, 4, [5, 40, 33]), (2, 8, [768, 1024, 1024, 768]), (5, 1, [7]), (1, 3, [1, 2])])
def test_ref_matches_numpy(s, g, dims):
    src, rec, index, offsets, weights = _case(s, g, dims)
    r, c, v = reward_ref(src, rec, index, offsets, weights)
    nr, nc, nv = _numpy_reward(src, rec, index.numpy(), dims, weights.numpy())
    np.testing.assert_allclose(r.numpy(), nr, atol=1e-5)
    np.testing.assert_allclose(c.numpy(), nc, atol=1e-5)
    assert (v.numpy() == nv).all()


@pytest.mark.triton
@pytest.mark.parametrize(
    "s,g,dims",
    [
        (3, 4, [5, 40, 33]),  # odd widths, not multiples of the block
        (2, 8, [768, 1024, 1024, 768]),  # the four real backbones' widths, G = 8
        (4, 1, [24]),  # group of one, single backbone
        (1, 5, [1100]),  # wider than one 1024 block: the inner loop runs twice
    ],
)
def test_triton_matches_ref(s, g, dims):
    src, rec, index, offsets, weights = _case(s, g, dims)
    want = reward_ref(src, rec, index, offsets, weights)
    got = fused_reward(src, rec, index, offsets, weights, backend="triton")
    torch.testing.assert_close(got[0], want[0], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=2e-6, rtol=1e-5)
    assert torch.equal(got[2], want[2])


@pytest.mark.triton
def test_triton_bf16_error_within_twice_the_reference_error():
    src, rec, index, offsets, weights = _case(2, 4, [64, 96], dtype=torch.float32)
    exact = _numpy_reward(src, rec, index.numpy(), [64, 96], weights.numpy())[0]
    src16, rec16 = src.bfloat16(), rec.bfloat16()
    # bf16 inputs, fp32 accumulation in both: the kernel's error stays within 2x the reference's (+ small atol).
    err_ref = np.abs(reward_ref(src16, rec16, index, offsets, weights)[0].numpy() - exact).max()
    err_tri = np.abs(fused_reward(src16, rec16, index, offsets, weights, backend="triton")[0].numpy() - exact).max()
    assert err_tri <= 2 * err_ref + 1e-6


@pytest.mark.triton
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_finite_features_and_failed_rows_are_flagged_never_nan(backend):
    src, rec, index, offsets, weights = _case(3, 4, [6, 10])
    rec[1, 2] = float("nan")  # NaN in backbone 0 of one reconstruction
    rec[5, 12] = float("inf")  # inf in backbone 1 of another
    src[2, 0] = float("-inf")  # a broken source spoils its whole group (rows 8..11)
    failed = torch.zeros(12, dtype=torch.bool)
    failed[3] = True
    rewards, cos, valid = fused_reward(src, rec, index, offsets, weights, failed, fill=-1.0, backend=backend)
    expect_invalid = {1, 3, 5, 8, 9, 10, 11}
    assert set(torch.nonzero(~valid).flatten().tolist()) == expect_invalid
    assert torch.isfinite(rewards).all() and torch.isfinite(cos).all()
    assert (rewards[~valid] == -1.0).all() and (cos[~valid] == -1.0).all()
    ok = valid.nonzero().flatten()
    want = _numpy_reward(src, rec, index.numpy(), [6, 10], weights.numpy())[0]
    np.testing.assert_allclose(rewards[ok].numpy(), want[ok.numpy()], atol=1e-5)


def test_auto_dispatch_uses_pytorch_on_cpu(monkeypatch):
    import uae_fast.kernels.reward as mod

    def boom(*args, **kwargs):
        raise AssertionError("Triton launched for a CPU tensor")

    monkeypatch.setattr(mod, "_launch", boom)
    src, rec, index, offsets, weights = _case(2, 2, [8])
    rewards, _, _ = fused_reward(src, rec, index, offsets, weights)  # backend="auto"
    assert rewards.shape == (4,)


def test_shape_errors_are_clear():
    src, rec, index, offsets, weights = _case(2, 2, [8])
    with pytest.raises(ValueError, match="share D"):
        fused_reward(src[:, :4], rec, index, offsets, weights)
    with pytest.raises(ValueError, match="index must be"):
        fused_reward(src, rec, index[:3], offsets, weights)
    with pytest.raises(ValueError, match="K \\+ 1"):
        fused_reward(src, rec, index, offsets[:1], weights)
    with pytest.raises(ValueError, match="backend"):
        fused_reward(src, rec, index, offsets, weights, backend="cuda")
