"""scripts/memory_plan.py: parameter counts and the per-engine arithmetic, checked against maths written here."""

from __future__ import annotations

import pytest
import torch

GIB = 2**30
H, FF, KV = 2048, 11008, 256  # Qwen2.5-3B LLM: hidden, MLP width, 2 KV heads × 128
D = 2432  # SD3.5-Large DiT width (38 heads × 64)


@pytest.fixture(scope="module")
def plan(script_module):
    return script_module("memory_plan")


@pytest.fixture(scope="module")
def counts(plan):
    return plan.param_counts()  # cached in the module: the meta models are built once per test run


def test_lora_count_of_one_linear(plan):
    from peft import LoraConfig, inject_adapter_in_model

    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(2048, 11008))
        assert plan.lora_formula(model, ["0"], 32) == 32 * (2048 + 11008)
        inject_adapter_in_model(LoraConfig(r=32, lora_alpha=64, target_modules=["0"]), model)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == 32 * (2048 + 11008)


def test_lora_counts_of_the_real_models(counts):
    per_qwen_layer = (H + H) + (H + KV) * 2 + (H + H) + (H + FF) * 2 + (FF + H)  # q, k, v, o, gate, up, down
    assert counts["llm_lora"] == counts["llm_lora_formula"] == 36 * 32 * per_qwen_layer
    # 8 square projections per joint block; the last block is context_pre_only (no to_add_out).
    assert counts["dit_lora"] == counts["dit_lora_formula"] == 32 * (D + D) * (38 * 8 - 1)


def test_model_sizes_match_the_published_ones(counts):
    assert counts["sd3.5-large-dit"] == pytest.approx(8.05e9, rel=0.01)  # "8.1B"
    assert counts["qwen2.5-vl-3b"] == pytest.approx(3.75e9, rel=0.02)  # "3.75B" (lm_head tied to the embeddings)
    assert counts["projector"] == 2048 * 8192 + 8192 + 8192 * 4096 + 4096
    assert counts["sd3-vae"] == pytest.approx(83.8e6, rel=0.02)
    for name in ("clip", "dinov2", "dinov3", "longclip"):  # ViT-L image towers, ~0.3B each
        assert counts[name] == pytest.approx(304e6, rel=0.02), name


def test_sharded_rollouts_hold_the_whole_wrapped_model(plan):
    """While it samples, an fsdp2 or zero3 rank holds the whole captioner (base in bf16), as a zero2 rank always
    does."""
    args = plan.parse_args(["--gpus", "8"])
    for stage in ("g4u", "u4g", "unified"):
        zero2 = plan.plan_row(stage, "zero2", args)
        for engine in ("fsdp2", "zero3"):
            sharded = plan.plan_row(stage, engine, args)
            assert sharded["frozen"] + sharded["rollout_gather"] == pytest.approx(zero2["frozen"], rel=1e-9)
            assert plan.plan_row("pretrain", engine, args)["rollout_gather"] == 0


def test_engine_arithmetic(plan, counts):
    args = plan.parse_args(["--gpus", "8"])
    rows = {e: plan.plan_row("pretrain", e, args) for e in plan.ENGINES}
    trained = counts["sd3.5-large-dit"] + counts["projector"]
    assert rows["ddp"]["optimizer"] == pytest.approx(trained * 12 / GIB)  # fp32 master + 2 moments
    assert rows["ddp"]["grads"] == pytest.approx(trained * 4 / GIB)
    for engine in ("zero2", "zero3", "fsdp2"):
        assert rows[engine]["optimizer"] == pytest.approx(rows["ddp"]["optimizer"] / 8)
        assert rows[engine]["grads"] == pytest.approx(rows["ddp"]["grads"] / 8)
    assert rows["zero2"]["trained"] == rows["ddp"]["trained"]  # ZeRO-2 keeps the weights replicated
    assert rows["zero3"]["trained"] < rows["ddp"]["trained"] / 4
    assert rows["ddp"]["total"] > 80 and rows["zero2"]["total"] < 80  # full DiT fine-tuning needs sharding

    g4u = {e: plan.plan_row("g4u", e, args) for e in plan.ENGINES}
    assert g4u["zero2"]["optimizer"] == pytest.approx(g4u["ddp"]["optimizer"] / 8)
    assert g4u["zero3"]["trained"] == pytest.approx(g4u["ddp"]["trained"] / 8)
    replicated = counts["sd3.5-large-dit"] + counts["dit_buffers"] + counts["sd3-vae"] + counts["rewards"]
    assert g4u["ddp"]["frozen"] == pytest.approx((replicated + counts["captioner"]) * 2 / GIB)
    assert g4u["zero3"]["frozen"] > replicated * 2 / GIB  # the frozen decoder is not sharded by default
    # distributed.shard_frozen (fsdp2): the DiT's blocks split 8 ways; the rest of it and 2 gathered blocks whole
    dit, blocks, block = counts["sd3.5-large-dit"], counts["dit_blocks"], counts["dit_block"]
    shard_frozen = plan.plan_row("g4u", "fsdp2", args, shard_frozen=True)
    held = dit - blocks + blocks / 8 + 2 * block
    assert shard_frozen["frozen"] == pytest.approx(g4u["fsdp2"]["frozen"] - (dit - held) * 2 / GIB)
    assert shard_frozen["total"] < g4u["fsdp2"]["total"] - 10  # ~13 GiB of the 16 GiB DiT
    # u4g: the captioner's LLM layers split 8 ways (its vision tower counted whole)
    u4g = plan.plan_row("u4g", "fsdp2", args)
    layers, layer = counts["qwen_blocks"], counts["qwen_layer"]
    held = counts["captioner"] - layers + layers / 8 + 2 * layer
    sharded = plan.plan_row("u4g", "fsdp2", args, shard_frozen=True)
    assert sharded["frozen"] == pytest.approx(u4g["frozen"] - (counts["captioner"] - held) * 2 / GIB)


def test_activation_formula(plan):
    args = plan.parse_args(["--dit-batch", "2"])
    tokens = 2 * (64 * 64 + 512)  # 2 images of 1024² → 128² latents → 64² patches, + 512 caption tokens each
    checkpointed = 38 * tokens * D * 2 + tokens * 28 * D * 2
    assert plan.activations("pretrain", args) == pytest.approx(checkpointed)
    llm = 36 * 8192 * H * 2 + 8192 * (10 * H + 4 * FF) * 2
    assert plan.activations("g4u", args) >= llm


def test_table_prints_every_stage_and_engine(plan, capsys):
    assert plan.main(["--gpus", "4", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "engine" not in line]
    expected = [(s, e) for s in plan.STAGES for e in plan.ENGINES]
    for stage in ("g4u", "u4g"):
        expected.insert(expected.index((stage, "fsdp2")) + 1, (stage, "fsdp2 + `distributed.shard_frozen`"))
    assert [tuple(c.strip() for c in r.split("|")[1:3]) for r in rows] == expected
    assert all(r.rstrip(" |").endswith(("yes", "**no**")) for r in rows)
    assert "4 × 80 GB" in out and "≈" in out
    with pytest.raises(SystemExit):
        plan.main(["--gpus", "0"])
