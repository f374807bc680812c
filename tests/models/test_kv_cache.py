"""The static, prefix-shared KV cache and the token loop over it, against the DynamicCache loop they replaced.

The oracle `_dynamic_cache_sample` is the captioner's previous sampler: transformers' text model with a growing
`DynamicCache` (the prefix cache repeated G times), one token per step for every row until all have ended."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from uae_fast.models.captioner import Captioner, sample_token
from uae_fast.models.kv_cache import PrefixSharedKVCache
from uae_fast.models.sampling import PackedHead


@pytest.fixture(scope="module")
def captioner(tiny):
    return Captioner(tiny.encoder, tiny.processor)


@torch.no_grad()
def _dynamic_cache_sample(cap, images, g, max_new_tokens, temperature, generator, top_p=1.0):
    """The reference loop: every row forwarded every step; one uniform number per row per step."""
    b = len(images.prompt_ids)
    cache, last, mask, next_pos = cap.prefill(images, list(range(b)))
    cache.batch_repeat_interleave(g)
    last, mask, next_pos = (x.repeat_interleave(g, 0) for x in (last, mask, next_pos))
    n = b * g
    tokens = torch.full((n, max_new_tokens), cap.pad_id, dtype=torch.long)
    finished = torch.zeros(n, dtype=torch.bool)
    lengths = torch.full((n,), max_new_tokens)
    eos = torch.tensor(cap.eos_ids)
    steps = 0
    for t in range(max_new_tokens):
        logits = cap.encoder.lm_head(last).float().masked_fill(cap.banned, float("-inf"))
        token = torch.where(finished, cap.pad_id, sample_token(logits, temperature, top_p, generator))
        tokens[:, t] = token
        ended = ~finished & torch.isin(token, eos)
        lengths = torch.where(ended, t + 1, lengths)
        finished |= ended
        steps = t + 1
        if bool(finished.all()) or steps == max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype)], dim=1)
        out = cap.vl.language_model(
            inputs_embeds=cap.vl.get_input_embeddings()(token)[:, None],
            attention_mask=mask,
            position_ids=(next_pos + t).view(1, n, 1).expand(3, n, 1),
            cache=cache,
            use_cache=True,
        )
        last = out.last_hidden_state[:, -1]
    return tokens[:, :steps], lengths, ~finished


def _assert_same(ours, reference):
    tokens, lengths, truncated = reference
    assert torch.equal(ours.tokens, tokens)
    assert torch.equal(ours.lengths, lengths)
    assert torch.equal(ours.truncated, truncated)


# ------------------------------------------------------------------ attention
def _expanded_attention(q, pk, pv, mask, own_k, own_v, owner):
    """SDPA of each row over [its image's prefix, repeated per row ; its own tokens], transformers' KV grouping."""
    k = torch.cat([pk[owner], own_k], dim=2)
    v = torch.cat([pv[owner], own_v], dim=2)
    allowed = torch.cat([mask[owner].bool(), torch.ones(len(owner), own_k.shape[2], dtype=torch.bool)], dim=1)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=allowed[:, None, None])[:, :, 0]
    return out.reshape(len(owner), -1)


@pytest.mark.parametrize("graph_mode", [False, True])
def test_attention_equals_sdpa_over_the_repeated_prefix(graph_mode):
    """Prompts of different lengths (right-padded), rows dropped after step 1; a 0-d step tensor (all slots, future
    ones masked: fixed shapes for CUDA graphs) gives what the sliced step gives."""
    torch.manual_seed(0)
    b, g, heads, kv_heads, d, p, t = 3, 4, 8, 2, 16, 9, 5
    pk, pv = torch.randn(b, kv_heads, p, d), torch.randn(b, kv_heads, p, d)
    mask = torch.ones(b, p, dtype=torch.long)
    mask[0, 6:], mask[2, 3:] = 0, 0
    cache = PrefixSharedKVCache([(pk, pv)], mask, g, t)
    rows = torch.arange(b * g)
    history_k, history_v = torch.zeros(b * g, kv_heads, 0, d), torch.zeros(b * g, kv_heads, 0, d)
    for step in range(4):
        if step == 2:
            keep = torch.tensor([0, 2, 3, 5, 9])  # of the live rows: rows 0, 2, 3, 5 (images 0, 1) and 9 (image 2)
            cache.keep(keep)
            rows, history_k, history_v = rows[keep], history_k[keep], history_v[keep]
        n = len(rows)
        q, k, v = torch.randn(n, heads, d), torch.randn(n, kv_heads, d), torch.randn(n, kv_heads, d)
        history_k = torch.cat([history_k, k[:, :, None]], dim=2)
        history_v = torch.cat([history_v, v[:, :, None]], dim=2)
        ours = (
            cache.attend(0, q, k, v, torch.tensor(step), None)
            if graph_mode
            else cache.attend(0, q, k, v, step, step + 1)
        )
        expected = _expanded_attention(q, pk, pv, mask, history_k, history_v, rows // g)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert torch.equal(cache.slot[: cache.live], rows)


# ------------------------------------------------------------------ the loop against the DynamicCache loop
@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (1.0, 1.0), (0.7, 0.9)])
def test_same_tokens_as_the_dynamic_cache_loop(captioner, demo, temperature, top_p):
    """Same seed (or greedy) → the same tokens, for prompts of different lengths (the demo's aspect ratios)."""
    images = captioner.encode_images(demo)
    assert len({len(p) for p in images.prompt_ids}) > 1  # right-padded prompts: not a vacuous layout test
    seed = 11
    ours = captioner.sample(
        images, 3, max_new_tokens=12, temperature=temperature, top_p=top_p,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    reference = _dynamic_cache_sample(captioner, images, 3, 12, temperature, torch.Generator().manual_seed(seed), top_p)
    _assert_same(ours, reference)


def test_finished_rows_are_dropped_and_the_rest_is_unchanged(captioner, demo, monkeypatch):
    """Hot sampling ends rows at different steps: they leave the batch at the next check (their cache slots stay
    where they are), live rows carry on with the same draws (one uniform per original row per step), and every
    completion equals the reference's."""
    kept = []
    keep = PrefixSharedKVCache.keep

    def recording_keep(self, rows):
        kept.append((self.live, len(rows)))
        keep(self, rows)

    monkeypatch.setattr(PrefixSharedKVCache, "keep", recording_keep)
    images = captioner.encode_images(demo)
    ours = captioner.sample(images, 8, max_new_tokens=40, temperature=2.5, generator=torch.Generator().manual_seed(2))
    assert kept and all(after < before for before, after in kept)  # rows were dropped, more than once
    assert len(kept) > 1
    ended = ~ours.truncated
    assert 0 < int(ended.sum()) < len(ended) and len(set(ours.lengths[ended].tolist())) > 2
    reference = _dynamic_cache_sample(captioner, images, 8, 40, 2.5, torch.Generator().manual_seed(2))
    _assert_same(ours, reference)
    for i in range(len(ours.lengths)):  # pads after the end token
        assert bool((ours.tokens[i, int(ours.lengths[i]) :] == captioner.pad_id).all())


def test_all_rows_ending_stops_the_loop_at_the_longest(captioner, demo):
    """When every row has ended, the tokens stop at the longest completion, as the reference's do."""
    images = captioner.encode_images(demo[:1])
    ours = captioner.sample(images, 3, max_new_tokens=150, temperature=3.0, generator=torch.Generator().manual_seed(1))
    reference = _dynamic_cache_sample(captioner, images, 3, 150, 3.0, torch.Generator().manual_seed(1))
    _assert_same(ours, reference)
    assert not bool(ours.truncated.any()) and ours.tokens.shape[1] == int(ours.lengths.max()) < 150


# ------------------------------------------------------------------ the two-level sampler
def test_two_level_inverse_cdf_equals_the_one_level_one():
    """Vocabulary a multiple of 128 (Qwen's 151,936 is): blocks, then inside the block; same uniform → same token
    as the full cumulative sum (up to rounding at boundaries), masked entries never chosen, even at u = 0 or ~1."""
    torch.manual_seed(3)
    n, vocab = 4000, 1024
    logits = torch.randn(n, vocab) * 3
    logits[:, 500:700] = float("-inf")
    logits[:, -1] = float("-inf")  # the last entry of the last block is masked: the rounding fallback must skip it
    uniform = torch.rand(n, 1)
    uniform[:2] = torch.tensor([[0.0], [1 - 2**-24]])
    ours = sample_token(logits.clone(), 0.7, 1.0, None, uniform=uniform, inplace=True)
    probs = torch.softmax(logits / 0.7, -1)
    cdf = probs.cumsum(-1)
    reference = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).clamp(max=vocab - 1)[:, 0]
    assert float((ours == reference).double().mean()) > 0.999
    assert not bool(torch.isinf(logits.gather(1, ours[:, None])).any())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_rollout_equals_the_eager_one(tiny, demo):
    """On CUDA (fp32, no autocast): the graph-replayed decode step gives the eager step's greedy captions."""
    import uae_fast

    uae = uae_fast.load("tiny", device="cuda")
    cap = Captioner(uae.encoder, uae.processor)
    cap.cuda_dtype = None
    images = cap.encode_images(demo)
    graphed = cap.sample(images, 4, max_new_tokens=24, temperature=0)
    cap.cuda_graphs = False
    eager = cap.sample(images, 4, max_new_tokens=24, temperature=0)
    assert torch.equal(graphed.tokens, eager.tokens) and torch.equal(graphed.lengths, eager.lengths)


# ------------------------------------------------------------------ the LM head's packed GEMM (CPU, MKL)
@pytest.mark.skipif(not PackedHead.available(torch.nn.Linear(4, 4, bias=False)), reason="needs torch built with MKL")
def test_packed_head_is_the_plain_product_and_follows_the_weight():
    """x @ W.T in fp64 (to fp32 rounding) for all rows and for fewer live rows; an in-place update of the weight
    or another weight tensor is seen (the pack is made again), not multiplied stale."""
    torch.manual_seed(0)
    head = torch.nn.Linear(96, 1000, bias=False)
    packed = PackedHead()

    def expected(x):
        return (x.double() @ head.weight.detach().double().T).float()

    for n in (8, 5, 8):
        x = torch.randn(n, 96)
        torch.testing.assert_close(packed(head.weight, x, 8), expected(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        head.weight.mul_(-2.0)  # an optimizer step's in-place update
    x = torch.randn(8, 96)
    torch.testing.assert_close(packed(head.weight, x, 8), expected(x), rtol=1e-5, atol=1e-5)
    head.weight = torch.nn.Parameter(torch.randn(1000, 96))  # another tensor (a loaded checkpoint)
    torch.testing.assert_close(packed(head.weight, x[:3], 8), expected(x[:3]), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not PackedHead.available(torch.nn.Linear(4, 4, bias=False)), reason="needs torch built with MKL")
def test_a_trained_head_is_packed_per_rollout_a_frozen_one_kept(tiny, demo):
    """A trained head may change between rollouts unseen by its version counter (ZeRO-3 / FSDP2 gathers): its pack
    is dropped after each rollout; a frozen head's is kept for the next — one pack per weight, whichever captioner
    samples. Same tokens either way."""
    cap = Captioner(tiny.encoder, tiny.processor)
    weight = cap.encoder.lm_head.weight
    images = cap.encode_images(demo[:2])
    was = weight.requires_grad
    try:
        out = {}
        for trained in (True, False):
            weight.requires_grad_(trained)
            gen = torch.Generator().manual_seed(4)
            out[trained] = cap.sample(images, 3, max_new_tokens=6, temperature=1.0, generator=gen).tokens
            assert PackedHead.of(weight).held is not trained
        other = Captioner(tiny.encoder, tiny.processor)  # a second captioner over the same weight: the same pack
        again = other.sample(images, 3, max_new_tokens=6, temperature=1.0, generator=torch.Generator().manual_seed(4))
        assert PackedHead.of(weight) is PackedHead.of(cap.encoder.lm_head.weight) and PackedHead.of(weight).held
    finally:
        weight.requires_grad_(was)
    assert torch.equal(out[True], out[False]) and torch.equal(again.tokens, out[False])


def test_packed_head_only_for_a_plain_fp32_cpu_head():
    """A biased, bf16 or LoRA-wrapped head runs as a module (the loop's other path)."""
    assert not PackedHead.available(torch.nn.Linear(4, 4, bias=True))
    assert not PackedHead.available(torch.nn.Linear(4, 4, bias=False).bfloat16())
    assert not PackedHead.available(torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False)))
