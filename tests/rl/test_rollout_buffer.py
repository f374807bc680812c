"""C++ rollout buffer and first-fit-decreasing packing, checked against plain-Python references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uae_fast.rl import RolloutBuffer, pack_sequences


def _filled(n_groups: int = 3, g: int = 4, seed: int = 0) -> tuple[RolloutBuffer, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    buf = RolloutBuffer(sample_capacity=64, token_capacity=4096)
    seqs = []
    for p in range(n_groups):
        for _ in range(g):
            toks = rng.integers(0, 151_936, rng.integers(1, 40))
            buf.add(p, p, toks, prompt_len=1, reward=float(rng.normal()), truncated=bool(rng.random() < 0.3))
            seqs.append(toks)
    return buf, seqs


def test_round_trip_and_zero_copy_views():
    buf, seqs = _filled()
    assert len(buf) == 12 and buf.num_tokens == sum(map(len, seqs))
    for i, s in enumerate(seqs):
        np.testing.assert_array_equal(buf.sequence(i), s)
    np.testing.assert_array_equal(buf.tokens, np.concatenate(seqs))
    assert buf.tokens.dtype == np.int64 and buf.old_logprob.dtype == np.float32 and buf.truncated.dtype == bool
    # Writes through numpy and torch views land in the buffer.
    buf.old_logprob[:] = -1.5
    t = buf.tensor("ref_logprob")
    t += 2.0
    assert torch.from_numpy(buf.ref_logprob).eq(2.0).all() and (buf.old_logprob == -1.5).all()
    assert buf.tensor("tokens").data_ptr() == buf.tokens.ctypes.data


def test_growth_refused_while_views_live_then_allowed():
    buf = RolloutBuffer(sample_capacity=2, token_capacity=8)
    buf.add(0, 0, [1, 2, 3])
    view = buf.tokens
    with pytest.raises(ValueError, match="views are alive"):
        buf.add(0, 0, list(range(10)))
    assert len(buf) == 1  # all-or-nothing
    np.testing.assert_array_equal(view, [1, 2, 3])
    del view
    buf.add(0, 0, list(range(10)))  # no views: the storage may move
    np.testing.assert_array_equal(buf.sequence(1), np.arange(10))


def test_bad_samples_are_clear_errors():
    buf = RolloutBuffer()
    buf.add(0, 0, [5])
    with pytest.raises(ValueError, match="sample 1: has 0 tokens"):
        buf.add(0, 0, [])
    with pytest.raises(ValueError, match=r"sample 1: prompt_len 3 outside \[0, 2\]"):
        buf.add(0, 0, [1, 2], prompt_len=3)
    with pytest.raises(ValueError, match="lengths sum to 3"):
        buf.add_batch([0, 0], [0, 0], [1, 2], [1, 2])
    with pytest.raises(ValueError, match="old_logprob must be a 1-D array of length 2"):
        buf.add(0, 0, [1, 2], old_logprob=[0.1])
    with pytest.raises(ValueError, match="no field"):
        buf.view("logits")
    assert len(buf) == 1 and buf.num_tokens == 1


def _check_packing(lengths, res, budget, offsets=None):
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if offsets is None else offsets
    placed = np.concatenate([b.sample_index.numpy() for b in res.batches]) if res.batches else np.array([])
    for b in res.batches:
        seqs = b.sample_index.numpy()
        lens = lengths[seqs]
        assert b.num_tokens == lens.sum() and (b.num_tokens <= budget or len(seqs) == 1)
        np.testing.assert_array_equal(b.cu_seqlens.numpy(), np.concatenate([[0], np.cumsum(lens)]))
        assert b.cu_seqlens.dtype == torch.int32 and b.max_seqlen == lens.max()
        want_tok = np.concatenate([np.arange(offsets[s], offsets[s] + lengths[s]) for s in seqs])
        np.testing.assert_array_equal(b.token_index.numpy(), want_tok)
        np.testing.assert_array_equal(b.position_ids.numpy(), np.concatenate([np.arange(n) for n in lens]))
    np.testing.assert_array_equal(res.order.numpy(), placed)
    for pos, s in enumerate(placed):
        assert res.inverse[s] == pos
    return placed


def _ffd_reference(lengths, budget):
    """Textbook first-fit decreasing (O(n * bins)), ties in input order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins, free = [], []
    for i in order:
        for b, f in enumerate(free):
            if f >= lengths[i]:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(budget - lengths[i])
    return bins


def test_packing_equals_textbook_ffd_and_is_valid():
    rng = np.random.default_rng(0)
    lengths = rng.integers(40, 601, 500)
    res = pack_sequences(lengths, 2048)
    assert [b.sample_index.tolist() for b in res.batches] == _ffd_reference(lengths.tolist(), 2048)
    placed = _check_packing(lengths, res, 2048)
    assert sorted(placed.tolist()) == list(range(500))
    assert res.padding_fraction() < 0.05


def test_keep_groups_and_skipped_through_the_buffer():
    buf, seqs = _filled(n_groups=5, g=4, seed=1)
    buf.skipped[2] = True
    budget = 200
    res = buf.pack(budget, keep_groups=True)
    lengths = np.diff(buf.offsets)
    _check_packing(lengths, res, budget, offsets=buf.offsets[:-1])
    for g in range(5):
        members = [i for i in range(20) if buf.group_id[i] == g and not buf.skipped[i]]
        batch_of = {b_idx for b_idx, b in enumerate(res.batches) for s in b.sample_index.tolist() if s in members}
        assert len(batch_of) == 1, g
    assert res.inverse[2] == -1
    # Gathering with token_index reproduces each sequence.
    for b in res.batches:
        stream = buf.tokens[b.token_index.numpy()]
        cu = b.cu_seqlens.numpy()
        for k, s in enumerate(b.sample_index.tolist()):
            np.testing.assert_array_equal(stream[cu[k] : cu[k + 1]], seqs[s])


def test_oversize_and_zero_length():
    with pytest.raises(ValueError, match="sequence 1: 300 tokens exceed token_budget 256"):
        pack_sequences([10, 300, 20], 256)
    res = pack_sequences([10, 300, 20], 256, oversize="own_batch")
    assert [b.sample_index.tolist() for b in res.batches] == [[1], [2, 0]]
    with pytest.raises(ValueError, match="sequence 2: length 0"):
        pack_sequences([10, 20, 0], 256)
    assert pack_sequences([10, 20, 0], 256, include=[1, 1, 0]).inverse.tolist() == [1, 0, -1]
    with pytest.raises(ValueError, match=r"group 7 .* 120 tokens exceed token_budget 100"):
        pack_sequences([60, 60, 5], 100, group_ids=[7, 7, 8], keep_groups=True)
    with pytest.raises(ValueError, match="token_budget"):
        pack_sequences([1], 0)
    with pytest.raises(ValueError, match="oversize"):
        pack_sequences([1], 10, oversize="split")
    assert pack_sequences([], 10).batches == []


def test_shared_prefix_counts_once_per_group():
    """With keep_groups, a group's shared prompt is charged once against the budget (FFD over group costs, checked
    against the textbook FFD on those costs), and is not part of the packed tokens."""
    buf = RolloutBuffer()
    rng = np.random.default_rng(3)
    prompts = rng.integers(50, 300, 7)
    for group, prompt in enumerate(prompts):
        for _ in range(4):
            buf.add(group, group, rng.integers(0, 100, rng.integers(1, 30)))
    lengths = np.diff(buf.offsets)
    include = np.ones(len(buf), dtype=bool)
    include[[1, 2]] = False  # left out: not packed and not charged
    budget = 500
    shared = np.repeat(prompts, 4)  # the image prompt each caption of the group follows (not stored in the buffer)
    res = buf.pack(budget, keep_groups=True, shared_prefix=shared, include=include)
    costs = [
        int(p) + sum(int(lengths[i]) for i in range(4 * g, 4 * g + 4) if include[i]) for g, p in enumerate(prompts)
    ]
    expected = [
        [s for g in groups for s in range(4 * g, 4 * g + 4) if include[s]] for groups in _ffd_reference(costs, budget)
    ]
    assert [b.sample_index.tolist() for b in res.batches] == expected
    for b in res.batches:  # the packed stream holds the completions only
        assert b.num_tokens == sum(int(lengths[s]) for s in b.sample_index.tolist())
    with pytest.raises(ValueError, match="group 0 .* exceed token_budget"):
        buf.pack(int(prompts[0]), keep_groups=True, shared_prefix=shared)
    with pytest.raises(ValueError, match="needs keep_groups"):
        pack_sequences([1, 2], 10, shared_prefix=[5, 5])
