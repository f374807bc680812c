"""Stage 2a's bf16 training step on the tiny preset, on CUDA (`pytest -m cuda`).

The whole step runs on the GPU: rollout (static KV cache), frozen decoder, reward (fused kernel), GRPO update through
the fused LM-head loss (Triton). Checked: finite metrics in range, the LoRA adapters moved, nothing left on the CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_g4u_bf16_step_on_tiny(tmp_path, compiled_triton):
    from uae_fast.kernels import linear_logprobs as llp
    from uae_fast.train import G4UTrainer, load_train_config

    overrides = [
        f"output_dir={tmp_path}",
        "device=cuda",
        "batch_size=8",
        "num_generations=4",
        "max_steps=2",
        "decoder.steps=2",
        "learning_rate=1e-4",
        "report_images=0",
        "save_final_model=false",
        "tensorboard=false",
    ]
    trainer = G4UTrainer(load_train_config("g4u_tiny", overrides))
    encoder = trainer.policy.encoder
    params = {n: p for n, p in encoder.named_parameters() if p.requires_grad}
    assert params, "no trainable (LoRA) parameters"
    assert all(p.is_cuda for p in encoder.parameters())
    frozen = [p for p in encoder.parameters() if not p.requires_grad]
    assert torch.bfloat16 in {p.dtype for p in frozen}, "the tiny preset loads in bf16 on CUDA"
    before = {n: p.detach().clone() for n, p in params.items()}
    calls = []
    original = llp._use_triton
    llp._use_triton = lambda x: calls.append(x.is_cuda) or original(x)
    try:
        metrics = [trainer.train_step() for _ in range(2)]
    finally:
        llp._use_triton = original
    assert calls and all(calls), "the LM-head log-probs did not take the CUDA (Triton) path"
    for m in metrics:
        for key in ("loss", "reward", "reward_std", "completions/mean_length"):
            assert math.isfinite(m[key]), (key, m[key])
        assert -1.0 - 1e-3 <= m["reward"] <= 1.0 + 1e-3
    moved = [n for n, p in params.items() if not torch.equal(p.detach(), before[n])]
    assert moved, "no LoRA parameter changed after two optimizer steps"
    assert torch.cuda.max_memory_allocated() > 0
