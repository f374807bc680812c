"""The captioner as a policy: our KV-cached sampler and packed forward against transformers' own generate/forward."""

from __future__ import annotations

import pytest
import torch

import uae_fast
from uae_fast.models.encoder import caption_messages, special_token_ids_to_suppress
from uae_fast.train.config import LoraSettings
from uae_fast.train.policy import CaptionPolicy


@pytest.fixture(scope="module")
def policy():
    uae = uae_fast.load("tiny", device="cpu")
    return CaptionPolicy(uae.encoder, uae.processor, LoraSettings(r=4, alpha=8)), uae


def _processor_inputs(uae, images):
    text = uae.processor.apply_chat_template(caption_messages(), tokenize=False, add_generation_prompt=True)
    return uae.processor(text=[text] * len(images), images=images, padding=True, return_tensors="pt")


def test_prompt_and_pixels_equal_the_processor(policy, demo):
    pol, uae = policy
    encoded = pol.encode_images(demo)
    ref = _processor_inputs(uae, demo)
    assert torch.equal(encoded.grid_thw, ref["image_grid_thw"])
    for b in range(len(demo)):
        assert torch.equal(encoded.prompt_ids[b], ref["input_ids"][b][ref["attention_mask"][b].bool()])
    with torch.no_grad():  # features of the C++-preprocessed pixels == the ViT on the processor's pixels
        feats = pol.vl.get_image_features(ref["pixel_values"], ref["image_grid_thw"], return_dict=True).pooler_output
    for ours, theirs in zip(encoded.features, feats):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_greedy_sampling_equals_transformers_generate(policy, demo):
    pol, uae = policy
    reference = uae.caption(demo, temperature=0, max_new_tokens=10)  # HF generate on processor inputs
    completions = pol.sample(pol.encode_images(demo), 3, max_new_tokens=10, temperature=0)
    captions = pol.decode(completions)
    assert [captions[3 * b + g] for b in range(len(demo)) for g in range(3)] == [c for c in reference for _ in range(3)]


def test_vision_tower_runs_once_per_group(policy, demo):
    pol, _ = policy
    before = pol.images_encoded
    encoded = pol.encode_images(demo[:2])
    pol.sample(encoded, 8, max_new_tokens=4, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert pol.images_encoded - before == 2  # not 2 x 8


def test_sampled_logprobs_match_a_plain_forward(policy, demo):
    """Hidden states from our packed forward give the same log-probs as transformers' full forward (logits)."""
    pol, uae = policy
    encoded = pol.encode_images(demo[:2])
    g = 3
    comp = pol.sample(encoded, g, max_new_tokens=6, temperature=1.0, generator=torch.Generator().manual_seed(1))
    rows = [i // g for i in range(2 * g)]
    tokens = [comp.token_list(i) for i in range(2 * g)]
    with torch.no_grad():
        hidden, ids, seq = pol.completion_hidden(encoded, rows, tokens)
        ours = torch.log_softmax(uae.encoder.lm_head(hidden), -1).gather(1, ids[:, None])[:, 0]
        ref = _processor_inputs(uae, demo[:2])
        for i in range(2 * g):
            b = rows[i]
            prompt = ref["input_ids"][b][ref["attention_mask"][b].bool()]
            full = torch.cat([prompt, tokens[i]])[None]
            out = uae.encoder(
                input_ids=full,
                pixel_values=ref["pixel_values"][: int(ref["image_grid_thw"][0].prod())]
                if b == 0
                else ref["pixel_values"][int(ref["image_grid_thw"][0].prod()) :],
                image_grid_thw=ref["image_grid_thw"][b : b + 1],
                mm_token_type_ids=(full == uae.encoder.config.image_token_id).int(),
            )
            logp = torch.log_softmax(out.logits[0, len(prompt) - 1 : -1], -1).gather(1, tokens[i][:, None])[:, 0]
            torch.testing.assert_close(ours[seq == i], logp, atol=1e-5, rtol=0)


def test_special_tokens_are_never_sampled_and_truncation_is_flagged(policy, demo):
    pol, uae = policy
    comp = pol.sample(pol.encode_images(demo), 8, max_new_tokens=5, temperature=3.0,
                      generator=torch.Generator().manual_seed(2))  # fmt: skip
    banned = set(special_token_ids_to_suppress(uae.processor.tokenizer, keep=pol.eos_ids))
    for i in range(len(comp.lengths)):
        assert not set(comp.token_list(i).tolist()) & banned
        ended = bool(set(comp.token_list(i).tolist()) & set(pol.eos_ids))
        assert bool(comp.truncated[i]) == (not ended)
        assert ended or int(comp.lengths[i]) == 5
        assert not ended or comp.token_list(i)[-1].item() in pol.eos_ids  # the end token closes the completion


def test_reference_is_the_base_model(policy, demo):
    """With adapters disabled the policy is exactly the base model, whatever the LoRA weights are."""
    pol, _ = policy
    base = uae_fast.load("tiny", device="cpu").encoder
    encoded = pol.encode_images(demo[:1])
    tokens = [torch.tensor([5, 6, 7])]
    with torch.no_grad():
        for name, p in pol.encoder.named_parameters():
            if "lora_B" in name:
                p.normal_()  # LoRA B starts at 0: make the adapters matter
        h_lora, _, _ = pol.completion_hidden(encoded, [0], tokens)
        with pol.adapters_disabled():
            h_ref, _, _ = pol.completion_hidden(encoded, [0], tokens)
        base_pol = CaptionPolicy(base, pol.processor, None)
        h_base, _, _ = base_pol.completion_hidden(base_pol.encode_images(demo[:1]), [0], tokens)
        for name, p in pol.encoder.named_parameters():
            if "lora_B" in name:
                p.zero_()
    assert not torch.allclose(h_lora, h_base, atol=1e-3)
    torch.testing.assert_close(h_ref, h_base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_sampler_draws_from_the_right_distribution(top_p):
    from uae_fast.train.policy import _sample_token

    logits = torch.tensor([[2.0, 1.0, float("-inf"), 0.0, -1.0]]).expand(40000, -1)
    tokens = _sample_token(logits, 0.8, top_p, torch.Generator().manual_seed(0))
    probs = torch.softmax(logits[0] / 0.8, -1)
    if top_p < 1:  # keep the smallest prefix (by probability) whose mass reaches top_p, renormalise
        keep = probs.cumsum(-1) - probs <= top_p
        probs = torch.where(keep, probs, 0.0) / probs[keep].sum()
    freq = torch.bincount(tokens, minlength=5).float() / len(tokens)
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    assert freq[2] == 0


def test_gradients_through_the_shared_prefix_match_a_plain_forward(policy, demo):
    """LoRA gradients of Σ log p(completion) from our shared-prefix forward == transformers' full forward of each
    prompt + completion on its own (the prefix then runs once per completion)."""
    pol, uae = policy
    params = [p for n, p in pol.encoder.named_parameters() if p.requires_grad and "lora_" in n]
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in pol.encoder.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)  # B = 0 at init would leave the A gradients at exactly 0
    encoded = pol.encode_images(demo[:2])
    rows = [0, 0, 1]
    comps = [torch.tensor([5, 6, 7]), torch.tensor([8, 9]), torch.tensor([10, 11, 12, 13])]
    hidden, ids, _ = pol.completion_hidden(encoded, rows, comps)
    ours = torch.log_softmax(uae.encoder.lm_head(hidden), -1).gather(1, ids[:, None]).sum()
    grads = torch.autograd.grad(ours, params)

    ref_inputs = _processor_inputs(uae, demo[:2])
    split = int(ref_inputs["image_grid_thw"][0].prod())
    pixels = [ref_inputs["pixel_values"][:split], ref_inputs["pixel_values"][split:]]
    total = 0.0
    for b, c in zip(rows, comps):
        prompt = ref_inputs["input_ids"][b][ref_inputs["attention_mask"][b].bool()]
        full = torch.cat([prompt, c])[None]
        logits = uae.encoder(
            input_ids=full,
            pixel_values=pixels[b],
            image_grid_thw=ref_inputs["image_grid_thw"][b : b + 1],
            mm_token_type_ids=(full == uae.encoder.config.image_token_id).int(),
        ).logits[0, len(prompt) - 1 : -1]
        total = total + torch.log_softmax(logits, -1).gather(1, c[:, None]).sum()
    ref_grads = torch.autograd.grad(total, params)
    with torch.no_grad():
        for n, p in pol.encoder.named_parameters():
            if "lora_B" in n:
                p.zero_()
    torch.testing.assert_close(ours, total, atol=1e-4, rtol=0)
    assert max(float(g.abs().max()) for g in ref_grads) > 1e-3
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
