"""The one captioner: our C++-preprocessed, KV-cached sampler against transformers' processor, `generate` (greedy)
and logits warpers (sampling distribution). `UAE.caption` goes through it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

from uae_fast.errors import ConfigError
from uae_fast.models.captioner import Captioner, sample_token
from uae_fast.models.encoder import caption_messages, special_token_ids_to_suppress


@pytest.fixture(scope="module")
def captioner(tiny):
    return tiny.captioner


def _processor_inputs(uae, images):
    text = uae.processor.apply_chat_template(caption_messages(), tokenize=False, add_generation_prompt=True)
    return uae.processor(text=[text] * len(images), images=images, padding=True, return_tensors="pt")


def _suppressed(uae, captioner) -> list[int]:
    return special_token_ids_to_suppress(uae.processor.tokenizer, keep=captioner.eos_ids)


def _hf_greedy(uae, captioner, images, max_new_tokens: int) -> list[str]:
    """The oracle: transformers' `generate` on the processor's inputs (left-padded batch), same special tokens."""
    inputs = _processor_inputs(uae, images)
    tokenizer = uae.processor.tokenizer
    with torch.no_grad():
        out = uae.encoder.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            suppress_tokens=_suppressed(uae, captioner),
            eos_token_id=captioner.eos_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
    texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [t.strip() for t in texts]


def _hf_probs(uae, captioner, logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """[V] next-token probabilities of transformers' sampler: suppress → temperature → top-p → softmax."""
    warpers = LogitsProcessorList(
        [SuppressTokensLogitsProcessor(_suppressed(uae, captioner)), TemperatureLogitsWarper(temperature)]
        + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
    )
    scores = logits[None].float().clone()
    scores[:, len(uae.processor.tokenizer) :] = float("-inf")  # rows past the tokenizer: never sampled by either
    return torch.softmax(warpers(torch.zeros((1, 1), dtype=torch.long), scores), -1)[0]


def _assert_frequencies(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    """Empirical frequencies within 5 binomial standard deviations (+ 2e-3) of `probs`; zero where probs is 0."""
    n = len(tokens)
    freq = torch.bincount(tokens, minlength=len(probs)).double() / n
    probs = probs.double()
    bound = 5 * (probs * (1 - probs) / n).sqrt() + 2e-3
    assert bool(((freq - probs).abs() <= bound).all()), float(((freq - probs).abs() - bound).max())
    assert not bool(freq[probs == 0].any())


# ------------------------------------------------------------------ preprocessing
def test_prompt_and_pixels_equal_the_processor(captioner, tiny, demo):
    encoded = captioner.encode_images(demo)
    ref = _processor_inputs(tiny, demo)
    assert torch.equal(encoded.grid_thw, ref["image_grid_thw"])
    for b in range(len(demo)):
        assert torch.equal(encoded.prompt_ids[b], ref["input_ids"][b][ref["attention_mask"][b].bool()])
    with torch.no_grad():  # features of the C++-preprocessed pixels == the ViT on the processor's pixels
        feats = captioner.vl.get_image_features(
            ref["pixel_values"], ref["image_grid_thw"], return_dict=True
        ).pooler_output
    for ours, theirs in zip(encoded.features, feats):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_uint8_arrays_and_pil_images_encode_alike(captioner, demo):
    pil = [demo[0], demo[1].convert("L")]  # a grayscale PIL image is converted to RGB once
    arrays = [np.asarray(im.convert("RGB")) for im in pil]
    a, b = captioner.encode_images(pil), captioner.encode_images(arrays)
    assert torch.equal(a.grid_thw, b.grid_thw)
    assert all(torch.equal(x, y) for x, y in zip(a.prompt_ids, b.prompt_ids))
    assert all(torch.equal(x, y) for x, y in zip(a.features, b.features))
    for bad, message in [(arrays[0].astype(np.float32), "float32"), (arrays[0][..., 0], "shape"), ("x.png", "str")]:
        with pytest.raises(ConfigError, match=f"image 1: .*{message}"):
            captioner.encode_images([arrays[0], bad])


def test_vision_tower_runs_once_per_group(captioner, demo):
    before = captioner.images_encoded
    encoded = captioner.encode_images(demo[:2])
    captioner.sample(encoded, 8, max_new_tokens=4, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert captioner.images_encoded - before == 2  # not 2 x 8


# ------------------------------------------------------------------ greedy: equal to transformers' generate
def test_greedy_uae_caption_equals_transformers_generate(tiny, captioner, demo):
    reference = _hf_greedy(tiny, captioner, demo, max_new_tokens=10)
    assert len(set(reference)) > 1  # the images lead to different captions: the comparison is not vacuous
    ours = tiny.caption(demo, num_generations=3, temperature=0, max_new_tokens=10)  # G greedy captions: repeated
    assert ours == [c for c in reference for _ in range(3)]
    completions = captioner.sample(captioner.encode_images(demo), 2, max_new_tokens=10, temperature=0)
    assert captioner.decode(completions) == [c for c in reference for _ in range(2)]


def test_batch_size_bounds_chunks_not_results(tiny, demo):
    small = Captioner(tiny.encoder, tiny.processor, batch_size=2)
    kwargs = dict(max_new_tokens=8, temperature=0)
    assert small.caption(demo, 3, **kwargs) == tiny.captioner.caption(demo, 3, **kwargs)
    with pytest.raises(ConfigError, match="batch_size"):
        Captioner(tiny.encoder, tiny.processor, batch_size=0)


# ------------------------------------------------------------------ sampling: transformers' distribution
@pytest.mark.parametrize("temperature, top_p", [(0.7, 1.0), (1.2, 0.6)])
def test_sampled_tokens_follow_transformers_warpers(tiny, captioner, demo, temperature, top_p):
    """First and second tokens of 6,000 captions of one image (one prefill, cache repeated) against the exact
    next-token distributions of transformers' sampler on a plain full forward."""
    n = 6000
    encoded = captioner.encode_images(demo[:1])
    comp = captioner.sample(
        encoded, n, max_new_tokens=2, temperature=temperature, top_p=top_p, generator=torch.Generator().manual_seed(5)
    )
    ref = _processor_inputs(tiny, demo[:1])
    with torch.no_grad():
        logits = tiny.encoder(**ref).logits[0, -1]
    _assert_frequencies(comp.tokens[:, 0], _hf_probs(tiny, captioner, logits, temperature, top_p))

    # the second token, given the most frequent first one (which is not an end token)
    first = comp.tokens[:, 0]
    counts = torch.bincount(first).double()
    counts[captioner.eos_ids] = 0
    top = int(counts.argmax())
    full = torch.cat([ref["input_ids"][0], torch.tensor([top])])[None]
    with torch.no_grad():
        logits = tiny.encoder(
            input_ids=full,
            attention_mask=torch.ones_like(full),
            pixel_values=ref["pixel_values"],
            image_grid_thw=ref["image_grid_thw"],
            mm_token_type_ids=(full == tiny.encoder.config.image_token_id).int(),
        ).logits[0, -1]
    assert int(counts[top]) > 300
    _assert_frequencies(comp.tokens[first == top, 1], _hf_probs(tiny, captioner, logits, temperature, top_p))


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sample_token_matches_transformers_warpers(top_p):
    logits = torch.tensor([[2.0, 1.0, float("-inf"), 0.0, -1.0]]).expand(40000, -1)
    tokens = sample_token(logits, 0.8, top_p, torch.Generator().manual_seed(0))
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.8)] + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    probs = torch.softmax(warpers(torch.zeros((1, 1), dtype=torch.long), logits[:1].clone()), -1)[0]
    if top_p < 1:
        assert int((probs > 0).sum()) == 2  # the nucleus is a strict subset here
    _assert_frequencies(tokens, probs)


def test_special_tokens_are_never_sampled_and_truncation_is_flagged(tiny, captioner, demo):
    comp = captioner.sample(
        captioner.encode_images(demo), 8, max_new_tokens=5, temperature=3.0, generator=torch.Generator().manual_seed(2)
    )
    banned = set(_suppressed(tiny, captioner))
    for i in range(len(comp.lengths)):
        assert not set(comp.token_list(i).tolist()) & banned
        ended = bool(set(comp.token_list(i).tolist()) & set(captioner.eos_ids))
        assert bool(comp.truncated[i]) == (not ended)
        assert ended or int(comp.lengths[i]) == 5
        assert not ended or comp.token_list(i)[-1].item() in captioner.eos_ids  # the end token closes it


def test_uae_caption_is_the_captioner_with_a_seeded_generator(tiny, captioner, demo):
    ours = tiny.caption(demo[:2], num_generations=3, seed=4, max_new_tokens=6, temperature=0.9, top_p=0.95)
    encoded = captioner.encode_images(demo[:2])
    comp = captioner.sample(
        encoded, 3, max_new_tokens=6, temperature=0.9, top_p=0.95, generator=torch.Generator().manual_seed(4)
    )
    assert ours == captioner.decode(comp)
    assert len(set(ours)) > 1
