"""The captioner as a policy: the one captioner plus LoRA; its packed forward against transformers' own forward.

Sampling and preprocessing are the captioner's (tests/models/test_captioner.py)."""

from __future__ import annotations

import pytest
import torch

import uae_fast
from uae_fast.errors import ConfigError
from uae_fast.models.captioner import Captioner, Completions, ImageBatch
from uae_fast.models.encoder import caption_messages
from uae_fast.train import policy as policy_module
from uae_fast.train.config import LoraSettings
from uae_fast.train.policy import CaptionPolicy


@pytest.fixture(scope="module")
def policy():
    uae = uae_fast.load("tiny", device="cpu")
    return CaptionPolicy(uae.encoder, uae.processor, LoraSettings(r=4, alpha=8)), uae


def _processor_inputs(uae, images):
    text = uae.processor.apply_chat_template(caption_messages(), tokenize=False, add_generation_prompt=True)
    return uae.processor(text=[text] * len(images), images=images, padding=True, return_tensors="pt")


def test_policy_is_the_one_captioner(policy, demo):
    """A rollout is what `UAE.caption` samples: with fresh adapters (B = 0) and the same generator, equal captions."""
    pol, uae = policy
    assert isinstance(pol, Captioner)
    assert policy_module.Completions is Completions and policy_module.ImageBatch is ImageBatch  # re-exported
    assert pol.peft_model is pol.encoder.lora_model is not None
    encoded = pol.encode_images(demo[:2])
    comp = pol.sample(encoded, 3, max_new_tokens=6, temperature=0.8, generator=torch.Generator().manual_seed(7))
    expected = uae_fast.load("tiny", device="cpu").caption(demo[:2], num_generations=3, max_new_tokens=6,
                                                            temperature=0.8, seed=7)  # fmt: skip
    assert pol.decode(comp) == expected


def test_lora_goes_through_the_encoder_api(policy):
    """`attach_lora` wraps the inner model once; only adapter weights train."""
    pol, _ = policy
    from peft import LoraConfig

    names = [n for n, p in pol.encoder.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    with pytest.raises(ConfigError, match="already carries LoRA"):
        pol.encoder.attach_lora(LoraConfig(r=2, target_modules=["q_proj"]))


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
