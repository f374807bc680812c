"""Per-GPU memory plan for scaling uae_fast out: Qwen2.5-VL-3B captioner + SD3.5-Large decoder, every stage under the
four `distributed.engine`s (ddp, zero2, zero3, fsdp2), printed as a markdown table.

    python scripts/memory_plan.py [--gpus 8] [--gpu-memory 80] [--micro-batch-tokens 8192] [--dit-batch 2]

EXACT (given the dtypes below): parameter counts, from the real architectures built on the `meta` device from the
published configs written in this file (no weights, no downloads). LoRA counts come from PEFT's own `LoraConfig`
injected into the meta models, cross-checked against Σ r·(in + out) over the targeted Linears.

ASSUMED precision: every trained parameter is held as bf16 weights (2 B) + fp32 gradients (4 B) + AdamW fp32 master
copy and two fp32 moments (12 B); frozen models are bf16 (2 B) and replicated on every rank. Sharding: ddp replicates
all; zero2 divides gradients and optimizer state by N; zero3/fsdp2 also divide the weights of each *wrapped* (trained)
model by N, its frozen base included (DeepSpeed ZeRO-3 and `fully_shard` shard every parameter of the module they
wrap), plus a gather working set = the model's non-block weights + 2 blocks (the unit in use + the prefetched one).

ESTIMATED (≈): activations, with bf16 activations and flash/memory-efficient attention (no tokens² score matrix):
  checkpointed stack = layers · tokens · hidden · 2 B  (each block's saved input)
                       + tokens · v · 2 B              (one block recomputed in full during its backward)
  uncheckpointed stack = layers · tokens · v · 2 B
  v = activation values kept per token by one block: Qwen/ViT layer 10·H + 4·I (norms' fp32 inputs, LoRA inputs,
  q/k/v/out, the 4 MLP intermediates; rounded up from 9.25·H + 4·I); SD3 joint block 14·D with LoRA, 28·D trained
  in full (counted once with saved_tensors_hooks on a meta JointTransformerBlock, the eager attention's saved tensors
  replaced by flash's q/k/v/out; rounded up).
  Inference (no grad) keeps about one block's v per token; the VAE decoder under autograd keeps ≈ 12.3 kB per output
  pixel (saved_tensors_hooks on the meta SD3 VAE), without grad ≈ 6 live 128-channel tensors at full resolution.
  A stage's activations are the largest of its phases (rollout, render, update), which run one after the other.
  `overhead` is a flat guess for the CUDA context, NCCL and DeepSpeed buckets and allocator fragmentation.
"""

from __future__ import annotations

import argparse
import functools
from typing import NamedTuple

import torch

GIB = 2**30
ENGINES = ("ddp", "zero2", "zero3", "fsdp2")
STAGES = ("g4u", "u4g", "unified", "pretrain", "cold_start")
WEIGHT_B, GRAD_B, OPTIM_B, FROZEN_B, ACT_B = 2, 4, 12, 2, 2  # bytes per parameter / activation value (see docstring)

# Qwen/Qwen2.5-VL-3B-Instruct config.json (text fields live in text_config in transformers >= 5).
QWEN_TEXT = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=128000,
                 rms_norm_eps=1e-6, rope_theta=1e6, hidden_act="silu")  # fmt: skip
QWEN_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_chans=3, out_hidden_size=2048,
                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                   fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")  # fmt: skip
PROJECTOR = (2048, 8192, 4096)  # the UAE projector: Linear(2048, 8192) → GELU → Linear(8192, 4096)
# stabilityai/stable-diffusion-3.5-large transformer/config.json and vae/config.json.
SD35_LARGE_DIT = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                      attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                      caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                      qk_norm="rms_norm")  # fmt: skip
SD3_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
               layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu", norm_num_groups=32, sample_size=1024,
               use_quant_conv=False, use_post_quant_conv=False)  # fmt: skip
# The reward backbones as uae_fast.rewards.backbones builds them (ViT-L each): openai/clip-vit-large-patch14 vision
# tower + projection, facebook/dinov2-large, facebook/dinov3-vitl16-pretrain-lvd1689m, LongCLIP-L's image tower
# (open_clip VisionTransformer, QuickGELU).
CLIP_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
                patch_size=14, projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
DINOV2_L = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, patch_size=14,
                image_size=518)  # fmt: skip
DINOV3_L16 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=16,
                  num_register_tokens=4, query_bias=True, key_bias=False, value_bias=True)  # fmt: skip
LORA_R = 32  # llm_lora: r=32 α=64 on every Linear of the LLM; dit_lora: r=32 α=64 (u4g/cold-start defaults) on these:
DIT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]

# Workload (per GPU); the ≈ numbers scale with these.
CAPTION_TOKENS = 512  # llm conditioning: one token per caption token (max_completion_length 512)
PROMPT_TOKENS = 180  # 83 image tokens (max_pixels 65536 → 256 patches / 2×2 merge) + the chat template and instruction
ROLLOUT_SEQUENCES = 32  # captions generated at once per GPU (the default batch_size), KV cache for prompt + 512 new
RENDER_BATCH = 8  # images denoised at once per GPU during rollouts (CFG doubles the DiT batch)
COLD_START_SIDE = 512  # cold_start.size; one image per GPU
VAE_GRAD_BYTES_PER_PIXEL = 12_300
VAE_INFER_BYTES_PER_PIXEL = 6 * 128 * ACT_B
OVERHEAD_GIB = 3.0


@functools.cache
def param_counts() -> dict[str, int]:
    """Exact parameter counts of the meta-device models (cached: building Qwen2.5-VL takes a few seconds)."""
    import transformers as hf
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from open_clip.transformer import QuickGELU, VisionTransformer
    from peft import LoraConfig, inject_adapter_in_model

    def n(module) -> int:  # parameters() yields a tied weight once (Qwen's lm_head = embed_tokens)
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        cfg = hf.Qwen2_5_VLConfig(text_config=QWEN_TEXT, vision_config=QWEN_VISION, tie_word_embeddings=True)
        qwen = hf.Qwen2_5_VLForConditionalGeneration(cfg)
        dit = SD3Transformer2DModel(**SD35_LARGE_DIT)
        out = {
            "qwen2.5-vl-3b": n(qwen),
            "qwen_layer": n(qwen.model.language_model.layers[0]),
            "qwen_blocks": n(qwen.model.language_model.layers) + n(qwen.model.visual.blocks),
            "projector": PROJECTOR[0] * PROJECTOR[1] + PROJECTOR[1] + PROJECTOR[1] * PROJECTOR[2] + PROJECTOR[2],
            "sd3.5-large-dit": n(dit),
            "dit_block": max(n(b) for b in dit.transformer_blocks),
            "dit_blocks": n(dit.transformer_blocks),
            "dit_buffers": sum(b.numel() for b in dit.buffers()),  # pos_embed: never sharded, never trained
            "sd3-vae": n(AutoencoderKL(**SD3_VAE)),
            "clip": n(hf.CLIPVisionModelWithProjection(hf.CLIPVisionConfig(**CLIP_L14))),
            "dinov2": n(hf.Dinov2Model(hf.Dinov2Config(**DINOV2_L))),
            "dinov3": n(hf.DINOv3ViTModel(hf.DINOv3ViTConfig(**DINOV3_L16))),
            "longclip": n(VisionTransformer(224, 14, 1024, 24, 16, 4.0, output_dim=768, act_layer=QuickGELU)),
        }
        # LoRA with PEFT, targets chosen as uae_fast.train.policy / decoder_policy choose them.
        llm = qwen.model.language_model
        llm_linears = [name for name, m in llm.named_modules() if isinstance(m, torch.nn.Linear)]
        dit_linears = [name for name, m in dit.named_modules() if isinstance(m, torch.nn.Linear)]
        dit_targets = [name for name in dit_linears if any(name.endswith("." + t) for t in DIT_LORA_TARGETS)]
        out["llm_lora_formula"] = lora_formula(llm, llm_linears, LORA_R)
        out["dit_lora_formula"] = lora_formula(dit, dit_targets, LORA_R)
        for key, model, targets in (("llm_lora", llm, llm_linears), ("dit_lora", dit, dit_targets)):
            inject_adapter_in_model(LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules=targets), model)
            out[key] = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    out["captioner"] = out["qwen2.5-vl-3b"] + out["projector"]
    out["rewards"] = out["clip"] + out["dinov2"] + out["dinov3"] + out["longclip"]
    return out


def lora_formula(model, names: list[str], r: int) -> int:
    """Σ r·(in + out) over the named Linears: A is [r, in], B is [out, r], no biases."""
    wanted = set(names)
    return sum(r * (m.in_features + m.out_features) for name, m in model.named_modules() if name in wanted)


# ------------------------------------------------------------------ activations (bytes per GPU, ≈)
def stack_bytes(layers: int, tokens: int, hidden: int, values: int, checkpointed: bool) -> float:
    if checkpointed:
        return layers * tokens * hidden * ACT_B + tokens * values * ACT_B
    return layers * tokens * values * ACT_B


def qwen_values() -> int:
    return 10 * QWEN_TEXT["hidden_size"] + 4 * QWEN_TEXT["intermediate_size"]


def dit_tokens(side: int) -> int:  # 1024 px → 128² latents → 64² patches of 2×2, plus the caption stream
    return (side // 8 // SD35_LARGE_DIT["patch_size"]) ** 2 + CAPTION_TOKENS


def dit_train(batch: int, side: int, full: bool, checkpointed: bool = True) -> float:
    hidden = SD35_LARGE_DIT["caption_projection_dim"]
    values = (28 if full else 14) * hidden
    return stack_bytes(SD35_LARGE_DIT["num_layers"], batch * dit_tokens(side), hidden, values, checkpointed)


def render(side: int) -> float:
    """Rollout rendering without grad: one DiT block for RENDER_BATCH × 2 (CFG), then VAE decodes one at a time."""
    dit = 2 * RENDER_BATCH * dit_tokens(side) * 10 * SD35_LARGE_DIT["caption_projection_dim"] * ACT_B
    return max(dit, side * side * VAE_INFER_BYTES_PER_PIXEL)


def kv_cache() -> float:
    head_dim = QWEN_TEXT["hidden_size"] // QWEN_TEXT["num_attention_heads"]
    per_token = 2 * QWEN_TEXT["num_hidden_layers"] * QWEN_TEXT["num_key_value_heads"] * head_dim * ACT_B  # K and V
    return ROLLOUT_SEQUENCES * (PROMPT_TOKENS + CAPTION_TOKENS) * per_token


def activations(stage: str, args) -> float:
    llm = dict(layers=QWEN_TEXT["num_hidden_layers"], hidden=QWEN_TEXT["hidden_size"], values=qwen_values())
    if stage == "g4u":  # captions → render → update of the LoRA (micro_batch_tokens per forward/backward)
        return max(kv_cache(), render(1024), stack_bytes(tokens=args.micro_batch_tokens, checkpointed=True, **llm))
    if stage == "u4g":  # render → Flow-GRPO update, conditional branch with grad, negative branch without
        return max(render(1024), dit_train(args.dit_batch, 1024, full=False))
    if stage == "unified":  # the two stages take turns
        return max(activations("g4u", args), activations("u4g", args))
    if stage == "pretrain":
        return dit_train(args.dit_batch, 1024, full=True)
    # cold_start: one sampler step is recomputed whole (checkpointed per step, not per block), plus the caption's
    # llm conditioning, the VAE decode and the CLIP tower, all under autograd, for one image.
    side = COLD_START_SIDE
    conditioning = stack_bytes(tokens=CAPTION_TOKENS + 64, checkpointed=False, **llm)  # + the "generate" template
    clip = stack_bytes(24, 257, 1024, 10 * 1024 + 4 * 4096, checkpointed=False)  # ViT-L/14 at 224: 16² + CLS tokens
    return dit_train(1, side, full=False, checkpointed=False) + conditioning + side**2 * VAE_GRAD_BYTES_PER_PIXEL + clip


# ------------------------------------------------------------------ what each stage holds
class Stage(NamedTuple):
    trained: tuple[str, ...]  # parameter groups with requires_grad (AdamW state each)
    wrapped: tuple[str, ...]  # models the engine wraps: sharded under zero3/fsdp2 (their frozen base too)
    frozen: tuple[str, ...]  # replicated bf16 on every rank under every engine


STAGE_MODELS = {
    "g4u": Stage(("llm_lora",), ("captioner",), ("sd3.5-large-dit", "sd3-vae", "rewards")),
    "u4g": Stage(("dit_lora",), ("sd3.5-large-dit",), ("captioner", "sd3-vae", "rewards")),
    "unified": Stage(("llm_lora", "dit_lora"), ("captioner", "sd3.5-large-dit"), ("sd3-vae", "rewards")),
    # Full fine-tuning of DiT + projector; the captioner's conditioning is cached, so it is not resident.
    "pretrain": Stage(("sd3.5-large-dit", "projector"), ("sd3.5-large-dit",), ("sd3-vae",)),
    "cold_start": Stage(("llm_lora", "dit_lora"), ("captioner", "sd3.5-large-dit"), ("sd3-vae", "clip")),
}


# `distributed.shard_frozen` (fsdp2): the frozen model it shards in each stage that has one.
SHARDED_FROZEN = {"g4u": "sd3.5-large-dit", "u4g": "captioner"}


def gather_working_set(model: str, c: dict[str, int]) -> int:
    """Parameters a zero3/fsdp2 rank holds unsharded: the root unit (embeddings, norms, heads) + 2 blocks."""
    if model == "captioner":
        return c["captioner"] - c["qwen_blocks"] + 2 * c["qwen_layer"]
    return c["sd3.5-large-dit"] - c["dit_blocks"] + 2 * c["dit_block"]


def plan_row(stage: str, engine: str, args, *, shard_frozen: bool = False) -> dict[str, float]:
    """GiB per GPU of one stage under one engine (`shard_frozen`: the frozen model of `SHARDED_FROZEN` sharded per
    block, fsdp2)."""
    c, spec, n = param_counts(), STAGE_MODELS[stage], args.gpus
    trained = sum(c[k] for k in spec.trained)
    sharded = engine in ("zero3", "fsdp2")
    # Frozen base weights of the wrapped models (for full fine-tuning the base is the trained group itself).
    base = sum(c[m] for m in spec.wrapped if m not in spec.trained)
    dit_resident = "sd3.5-large-dit" in spec.wrapped + spec.frozen
    frozen = sum(c[m] for m in spec.frozen) + (c["dit_buffers"] if dit_resident else 0)
    gather = sum(gather_working_set(m, c) for m in spec.wrapped) if sharded else 0
    full_ft = any(m in spec.trained for m in spec.wrapped)
    if shard_frozen:  # its blocks split over the ranks; the rest and the blocks being gathered (2) held whole
        model = SHARDED_FROZEN[stage]
        blocks = c["dit_blocks"] if model == "sd3.5-large-dit" else c["qwen_blocks"]  # (the ViT's: counted whole)
        frozen -= c[model] - gather_working_set(model, c) - blocks / n
    row = {
        "trained": trained * WEIGHT_B / (n if sharded else 1) + (gather * WEIGHT_B if full_ft else 0),
        "frozen": frozen * FROZEN_B + base * FROZEN_B / (n if sharded else 1) + (0 if full_ft else gather * FROZEN_B),
        "grads": trained * GRAD_B / (1 if engine == "ddp" else n),
        "optimizer": trained * OPTIM_B / (1 if engine == "ddp" else n),
        "activations": activations(stage, args),
        # fsdp2 and zero3 (the engines' `gathered`) unshard the wrapped models whole for rollouts and the no-grad
        # reference/old passes, so that ranks need not sample in lockstep; stage 1 has no rollouts.
        "rollout_gather": (base * (1 - 1 / n) - gather) * FROZEN_B if sharded and stage != "pretrain" else 0,
    }
    row = {k: v / GIB for k, v in row.items()}
    row["overhead"] = args.overhead
    row["total"] = sum(row.values())
    return row


def table(args) -> str:
    cols = ["trained params", "frozen params", "grads", "optimizer", "≈ activations", "≈ rollout unshard",
            "≈ overhead", "≈ total/GPU"]  # fmt: skip
    lines = [
        f"| stage | engine | {' | '.join(c + ' (GiB)' for c in cols)} | fits {args.gpu_memory:g} GB |",
        "|" + "---|" * (len(cols) + 3),
    ]
    for stage in STAGES:
        for engine in ENGINES:
            r = plan_row(stage, engine, args)
            keys = ("trained", "frozen", "grads", "optimizer", "activations", "rollout_gather", "overhead", "total")
            fits = "yes" if r["total"] <= args.gpu_memory else "**no**"
            lines.append(f"| {stage} | {engine} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + f" | {fits} |")
            if stage in SHARDED_FROZEN and engine == "fsdp2":
                r = plan_row(stage, engine, args, shard_frozen=True)
                fits = "yes" if r["total"] <= args.gpu_memory else "**no**"
                cells = " | ".join(f"{r[k]:.2f}" for k in keys)
                lines.append(f"| {stage} | {engine} + `distributed.shard_frozen` | {cells} | {fits} |")
    return "\n".join(lines)


def counts_report() -> str:
    c = param_counts()
    keys = ("qwen2.5-vl-3b", "projector", "sd3.5-large-dit", "sd3-vae", "clip", "dinov2", "dinov3", "longclip")
    lines = [f"- {k}: {c[k]:,} params" for k in keys]
    lines.append(f"- llm_lora (r={LORA_R}, every Linear of the LLM): {c['llm_lora']:,} (PEFT; r·(in+out): "
                 f"{c['llm_lora_formula']:,})")  # fmt: skip
    lines.append(f"- dit_lora (r={LORA_R}, {', '.join(DIT_LORA_TARGETS)}): {c['dit_lora']:,} (PEFT; r·(in+out): "
                 f"{c['dit_lora_formula']:,})")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gpus", type=int, default=8, help="ranks N that zero2/zero3/fsdp2 shard over (default 8)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="memory per GPU in GB (default 80)")
    p.add_argument("--micro-batch-tokens", type=int, default=8192, help="g4u tokens per forward/backward")
    p.add_argument("--dit-batch", type=int, default=2, help="u4g/pretrain images per DiT forward/backward (1024²)")
    p.add_argument("--overhead", type=float, default=OVERHEAD_GIB, help="GiB for CUDA context, NCCL, fragmentation")
    args = p.parse_args(argv)
    if args.gpus < 1 or args.gpu_memory <= 0 or args.micro_batch_tokens < 1 or args.dit_batch < 1:
        p.error("--gpus, --gpu-memory, --micro-batch-tokens and --dit-batch must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # meta-device construction does no arithmetic
    print(f"## Memory plan: {args.gpus} × {args.gpu_memory:g} GB, per GPU\n")
    print("Parameter counts (exact, meta-device models from the published configs):\n")
    print(counts_report() + "\n")
    print(table(args) + "\n")
    print(f"Exact: trained/frozen/grads/optimizer (bf16 weights, fp32 grads, fp32 AdamW master + 2 moments). "
          f"≈ estimates: activations (g4u {args.micro_batch_tokens} tokens/micro-batch; u4g/pretrain "
          f"{args.dit_batch} × 1024² = {dit_tokens(1024)} tokens each; gradient checkpointing; flash attention), "
          f"overhead (flat). GiB = 2^30 B; an '80 GB' card shows ~79.6 GiB.")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
