"""Encoder: captioning determinism and shapes, special-token suppression, projector conditioning."""

from __future__ import annotations

import torch

from uae_fast.models.encoder import NEGATIVE_PROMPT, conditioning_messages


def test_caption_is_seeded_and_image_major(tiny, demo):
    a = tiny.caption(demo[:2], num_generations=3, seed=1)
    b = tiny.caption(demo[:2], num_generations=3, seed=1)
    c = tiny.caption(demo[:2], num_generations=3, seed=2)
    assert len(a) == 6 and all(isinstance(x, str) for x in a)
    assert a == b
    assert a != c
    assert len(set(a)) > 1  # sampling at temperature 0.7 gives different captions within a group


def test_caption_does_not_touch_global_rng(tiny, demo):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.caption(demo[:1], seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_sampling_never_emits_vision_or_chat_special_tokens(tiny, demo):
    tokenizer = tiny.processor.tokenizer
    vision = {tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|im_start|>")}
    # A high temperature makes every token likely; none of the suppressed ones may appear.
    text = tiny.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}]}], tokenize=False, add_generation_prompt=True
    )
    from uae_fast.models.encoder import special_token_ids_to_suppress

    suppressed = set(special_token_ids_to_suppress(tokenizer, keep=[tokenizer.convert_tokens_to_ids("<|im_end|>")]))
    assert vision <= suppressed
    inputs = tiny.processor(text=[text], images=demo[:1], return_tensors="pt")
    torch.manual_seed(0)
    out = tiny.encoder.generate(
        **inputs, do_sample=True, temperature=5.0, max_new_tokens=64, suppress_tokens=sorted(suppressed)
    )
    assert not set(out[0, inputs["input_ids"].shape[1] :].tolist()) & suppressed


def test_conditioning_equals_projector_over_final_hidden_states(tiny):
    """Reference: the official recipe, one caption at a time (no padding), `hidden_states[-1]` → projector."""
    captions = ["a cat", NEGATIVE_PROMPT, "a very long caption " * 5]
    embeds, mask, pooled = tiny.condition(captions)
    tokenizer, processor = tiny.processor.tokenizer, tiny.processor
    for row, caption in enumerate(captions):
        text = processor.apply_chat_template(conditioning_messages(caption), tokenize=False, add_generation_prompt=True)
        assert text.startswith("<|im_start|>system") and "<|im_start|>generate\n" + caption in text
        ids = torch.tensor([tokenizer.encode(text)])
        with torch.no_grad():
            hidden = tiny.encoder(input_ids=ids, output_hidden_states=True).hidden_states[-1]
            ref = tiny.encoder.projector(hidden)[0]
        n = ids.shape[1]
        assert mask[row].sum() == n and mask[row, :n].all()
        torch.testing.assert_close(embeds[row, :n], ref, atol=1e-5, rtol=0)
    assert pooled.shape == (3, tiny.decoder.pooled_empty.shape[1])


def test_projector_keys_follow_the_release(tiny):
    keys = set(tiny.encoder.state_dict())
    assert {"projector.0.weight", "projector.0.bias", "projector.2.weight", "projector.2.bias"} <= keys
    assert tiny.encoder.projector[2].out_features == tiny.decoder._base_transformer.config.joint_attention_dim


def test_attention_backend_is_sdpa_on_cpu_and_flash_attention_with_cuda(tiny, tiny_checkpoint, monkeypatch):
    import importlib.util

    import uae_fast
    from uae_fast.models import encoder as encoder_module

    assert encoder_module.attention_implementation() == "sdpa"
    assert tiny.encoder.config._attn_implementation == "sdpa"
    assert uae_fast.load(tiny_checkpoint, device="cpu").encoder.config._attn_implementation == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a)
    )
    assert encoder_module.attention_implementation() == "flash_attention_2"
