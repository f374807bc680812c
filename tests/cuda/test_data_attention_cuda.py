"""DALI's GPU JPEG decoder against the CPU decoder, and FlashAttention against SDPA (`pytest -m cuda`).

Each test also skips, with its reason, when its package (DALI / flash-attn) is not installed.
"""

from __future__ import annotations

import importlib.util
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _jpegs() -> list[bytes]:
    import skimage.data
    from PIL import Image

    out = []
    for name, size, sub in [("astronaut", (517, 333), 2), ("coffee", (448, 448), 0), ("chelsea", (31, 17), 2),
                            ("rocket", (1024, 768), 1)]:  # fmt: skip
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size, Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90, subsampling=sub)
        out.append(buf.getvalue())
    return out


def test_dali_gpu_decoder_matches_cpu_decoder():
    from uae_fast.data.decode import ImageDecoder, available_backends

    if "dali-mixed" not in available_backends():
        pytest.skip(
            f"DALI's GPU decoder is not usable (backends here: {available_backends()}): pip install nvidia-dali-cuda130"
        )
    data = _jpegs()
    with ImageDecoder("dali-mixed") as gpu, ImageDecoder("cpu") as cpu:
        got, want = gpu.decode(data), cpu.decode(data)
        assert (gpu.sizes(data) == cpu.sizes(data)).all()
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == np.uint8 and a.shape == b.shape, (i, a.shape, b.shape)
        diff = np.abs(a.astype(np.int16) - b)
        # nvJPEG has its own IDCT and chroma upsampling: the allowance stated in tests/data/test_decode.py.
        assert diff.max() <= 4 and diff.mean() <= 0.5, (i, int(diff.max()), float(diff.mean()))


def _needs_flash():
    if importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed (transformers then uses SDPA)")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads, kv_heads, length", [(16, 2, 333), (4, 4, 64)])
def test_flash_attention_matches_sdpa(causal, heads, kv_heads, length):
    _needs_flash()
    from flash_attn import flash_attn_func

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, length, heads, 128, generator=gen)
    k = torch.randn(2, length, kv_heads, 128, generator=gen)
    v = torch.randn(2, length, kv_heads, 128, generator=gen)

    def sdpa(q, k, v):  # [B, L, H, D] in and out; grouped KV heads repeated
        rep = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return out.transpose(1, 2)

    bf = [t.to("cuda", torch.bfloat16) for t in (q, k, v)]
    exact = sdpa(*(t.double() for t in bf))
    flash = flash_attn_func(*bf, causal=causal)
    ref = sdpa(*bf)
    err, ref_err = (flash.double() - exact).abs().max().item(), (ref.double() - exact).abs().max().item()
    assert err <= 2 * ref_err + 1e-3, (err, ref_err)


def test_tiny_encoder_flash_attention_matches_sdpa():
    """The tiny captioner's logits with flash_attention_2 (what `attention_implementation` picks when installed)
    vs SDPA, both bf16, against the fp32 SDPA logits."""
    _needs_flash()
    import uae_fast

    uae = uae_fast.load("tiny", device="cuda")
    encoder, processor = uae.encoder, uae.processor
    from uae_fast.data.demo import demo_images
    from uae_fast.models.encoder import caption_messages

    text = processor.apply_chat_template(caption_messages(), add_generation_prompt=True)
    inputs = processor(text=[text], images=[demo_images()[0].image.convert("RGB")], return_tensors="pt").to("cuda")

    def logits(impl, dtype):
        encoder.to(dtype)
        encoder.set_attn_implementation(impl)
        with torch.no_grad():
            return encoder(**inputs).logits.double()

    flash, sdpa = logits("flash_attention_2", torch.bfloat16), logits("sdpa", torch.bfloat16)
    exact = logits("sdpa", torch.float32)
    err, ref_err = (flash - exact).abs().max().item(), (sdpa - exact).abs().max().item()
    assert err <= 2 * ref_err + 1e-3, (err, ref_err)
