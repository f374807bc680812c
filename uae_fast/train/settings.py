"""Settings shared by the stages (LoRA) and those of the decoder's pretraining stages: stage 1 (`pretrain:`) and
the cold start (`cold_start:`).

Names follow diffusers' SD3 training scripts where the concept is the same (`weighting_scheme`, `logit_mean`,
`logit_std`, `mode_scale`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import check_all
from ..errors import ConfigError

__all__ = [
    "ColdStartSettings",
    "DIT_ATTENTION_PROJECTIONS",
    "DistributedSettings",
    "LoraSettings",
    "PretrainSettings",
]

# The DiT's attention projections (image stream and caption stream): Flow-GRPO's LoRA targets for SD3.
DIT_ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "uniform")
FINETUNE_MODES = ("lora", "full")
ENGINES = ("ddp", "fsdp2", "zero2", "zero3")  # distributed.engine (uae_fast.dist.engines)
COLD_START_CAPTIONS = ("sample", "greedy")


@dataclass
class LoraSettings:
    r: int = field(default=32, metadata={"help": "LoRA rank (the release: 32)"})
    alpha: int = field(default=64, metadata={"help": "LoRA alpha (the release: 64)"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    train_embeddings: bool = field(
        default=False, metadata={"help": "also train the token embeddings (a full copy, saved with the adapter)"}
    )

    def __post_init__(self):
        if self.r < 1 or self.alpha <= 0:
            raise ConfigError(f"lora.r must be >= 1 and lora.alpha > 0, got r={self.r}, alpha={self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class PretrainSettings:
    """Stage 1: the rectified-flow loss on (image, long caption) pairs; the captioner's LLM stays frozen."""

    batch_size: int = field(default=8, metadata={"help": "image-caption pairs per optimizer step"})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate of the DiT (and projector)"})
    finetune: str = field(
        default="lora", metadata={"help": f"how the DiT is trained, one of {FINETUNE_MODES} (full: every weight)"}
    )
    train_projector: bool = field(
        default=True, metadata={"help": "llm mode: also train the LLM→DiT projector (the encoder stays frozen)"}
    )
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=64, alpha=64))
    lora_targets: list[str] = field(
        default_factory=lambda: list(DIT_ATTENTION_PROJECTIONS),
        metadata={"help": "finetune=lora: DiT module names (suffixes) carrying LoRA"},
    )
    resolutions: list[list[int]] = field(
        default_factory=lambda: [[0, 512]],
        metadata={"help": "resolution schedule [[from_step, side], ...]: e.g. [[0, 512], [2000, 1024]]"},
    )
    weighting_scheme: str = field(
        default="logit_normal",
        metadata={"help": f"timestep density and loss weighting, one of {WEIGHTING_SCHEMES} (SD3: logit_normal)"},
    )
    logit_mean: float = field(default=0.0, metadata={"help": "logit_normal: mean of the logit of σ"})
    logit_std: float = field(default=1.0, metadata={"help": "logit_normal: std of the logit of σ"})
    mode_scale: float = field(default=1.29, metadata={"help": "mode: the scale of the mode density"})
    ema_decay: float = field(default=0.0, metadata={"help": "EMA of the trained weights (0: off; e.g. 0.999)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute DiT blocks in the backward"})
    conditioning_cache: int = field(
        default=4096,
        metadata={"help": "captions whose frozen conditioning (the LLM pass) stays cached on the CPU and is reused "
                  "across epochs (LRU); 0: recompute every step"},
    )  # fmt: skip
    eval_images: int = field(
        default=4, metadata={"help": "images of the own-vs-shuffled caption evaluation (the first in the data)"}
    )
    eval_steps: int = field(default=0, metadata={"help": "evaluate every n steps (0: at the start and the end only)"})
    min_caption_words: int = field(default=1, metadata={"help": "pairs with shorter captions are skipped and counted"})

    def __post_init__(self):
        check_all(
            [
                (self.batch_size >= 1, f"pretrain.batch_size must be >= 1, got {self.batch_size}"),
                (self.learning_rate > 0, f"pretrain.learning_rate must be > 0, got {self.learning_rate}"),
                (
                    self.finetune in FINETUNE_MODES,
                    f"pretrain.finetune must be one of {FINETUNE_MODES}, got {self.finetune!r}",
                ),
                (not self.lora.train_embeddings, "pretrain.lora.train_embeddings: the DiT has no token embeddings"),
                (bool(self.lora_targets), "pretrain.lora_targets is empty: name the DiT modules to adapt"),
                (
                    self.weighting_scheme in WEIGHTING_SCHEMES,
                    f"pretrain.weighting_scheme must be one of {WEIGHTING_SCHEMES}, got {self.weighting_scheme!r}",
                ),
                (self.logit_std > 0, f"pretrain.logit_std must be > 0, got {self.logit_std}"),
                (0 <= self.ema_decay < 1, f"pretrain.ema_decay must be in [0, 1), got {self.ema_decay}"),
                (self.min_caption_words >= 0, "pretrain.min_caption_words must be >= 0"),
                (self.conditioning_cache >= 0, "pretrain.conditioning_cache must be >= 0"),
                (self.eval_images >= 0 and self.eval_steps >= 0, "pretrain.eval_images and eval_steps must be >= 0"),
            ]
        )
        steps = []
        for entry in self.resolutions:
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
                raise ConfigError(f"pretrain.resolutions entries are [from_step, side], got {entry!r}")
            start, side = int(entry[0]), int(entry[1])
            if side < 8 or side % 8:
                raise ConfigError(f"pretrain.resolutions: side {side} must be a positive multiple of 8")
            steps.append(start)
        if not steps or steps[0] != 0 or steps != sorted(set(steps)):
            raise ConfigError(
                f"pretrain.resolutions must start at step 0 with increasing steps, got {self.resolutions}"
            )

    def resolution_at(self, step: int) -> int:
        """The image side trained at optimizer step `step` (0-based)."""
        side = int(self.resolutions[0][1])
        for start, value in self.resolutions:
            if step >= int(start):
                side = int(value)
        return side


@dataclass
class ColdStartSettings:
    """The cold start: reconstruct through a short differentiable sampler and minimise 1 − cos(CLIP(x̃), CLIP(x))."""

    batch_size: int = field(default=4, metadata={"help": "images per optimizer step"})
    num_steps: int = field(default=10, metadata={"help": "steps of the differentiable sampler"})
    size: int = field(default=512, metadata={"help": "side of the reconstruction in pixels (a multiple of 8)"})
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate of both adapters"})
    backbone: str = field(
        default="clip", metadata={"help": "the reward backbone whose features are compared (reward.backbones)"}
    )
    checkpoint_steps: bool = field(
        default=True, metadata={"help": "activation checkpointing per sampler step: memory flat in num_steps"}
    )
    captions: str = field(
        default="sample",
        metadata={"help": f"how the captioner captions a training image, one of {COLD_START_CAPTIONS} (sample: "
                  "temperature/top_p/max_completion_length of the top level, a new caption each step)"},
    )  # fmt: skip
    caption_with_adapters: bool = field(
        default=False,
        metadata={"help": "caption with the encoder's LoRA on; off: the base captioner captions, so the adapter "
                  "trained here for the conditioning does not also change what is captioned"},
    )  # fmt: skip
    eval_images: int = field(
        default=4,
        metadata={"help": "images (the dataset's first, in file order) whose reconstruction similarity is measured "
                  "with fixed noise and greedy captions before the first step and after the last "
                  "(eval/similarity); 0: off"},
    )  # fmt: skip
    train_encoder: bool = field(default=True, metadata={"help": "train the captioner's LLM LoRA (top-level lora)"})
    train_decoder: bool = field(default=True, metadata={"help": "train the DiT's LoRA"})
    dit_lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "the DiT's LoRA"})
    lora_targets: list[str] = field(
        default_factory=lambda: list(DIT_ATTENTION_PROJECTIONS),
        metadata={"help": "DiT module names (suffixes) carrying LoRA"},
    )

    def __post_init__(self):
        check_all(
            [
                (self.batch_size >= 1, f"cold_start.batch_size must be >= 1, got {self.batch_size}"),
                (self.num_steps >= 1, f"cold_start.num_steps must be >= 1, got {self.num_steps}"),
                (
                    self.size >= 8 and self.size % 8 == 0,
                    f"cold_start.size must be a positive multiple of 8, got {self.size}",
                ),
                (self.learning_rate > 0, f"cold_start.learning_rate must be > 0, got {self.learning_rate}"),
                (
                    self.train_encoder or self.train_decoder,
                    "cold_start trains nothing: set cold_start.train_encoder or cold_start.train_decoder",
                ),
                (
                    self.captions in COLD_START_CAPTIONS,
                    f"cold_start.captions must be one of {COLD_START_CAPTIONS}, got {self.captions!r}",
                ),
                (self.eval_images >= 0, f"cold_start.eval_images must be >= 0, got {self.eval_images}"),
                (not self.dit_lora.train_embeddings, "cold_start.dit_lora.train_embeddings: the DiT has none"),
                (bool(self.lora_targets), "cold_start.lora_targets is empty: name the DiT modules to adapt"),
            ]
        )


@dataclass
class DistributedSettings:
    engine: str = field(
        default="ddp",
        metadata={"help": "how the ranks of a torchrun / deepspeed launch share the trained weights: ddp "
                  "(replicated), fsdp2 (sharded blocks), zero2 (DeepSpeed ZeRO-2) or zero3 (ZeRO-3: weights "
                  "partitioned too); one process needs none"},
    )  # fmt: skip
    timeout_s: float = field(
        default=600.0,
        metadata={"help": "seconds a rank waits for the others in a collective before the job stops (a rank died or "
                  "hangs)"},
    )  # fmt: skip
    deepspeed_config: str | None = field(
        default=None,
        metadata={
            "help": "zero2 / zero3: a DeepSpeed JSON instead of the shipped configs/deepspeed/zero2.json / zero3.json"
        },
    )
    shard_frozen: bool = field(
        default=False,
        metadata={"help": "fsdp2: shard the frozen model's blocks over the ranks too (g4u: the decoder's DiT; u4g: "
                  "the captioner), each block gathered for its forward — for GPUs that cannot hold it whole"},
    )  # fmt: skip

    def __post_init__(self):
        engines = ", ".join(ENGINES)
        check_all(
            [
                (self.engine in ENGINES, f"distributed.engine must be one of {engines}, got {self.engine!r}"),
                (self.timeout_s > 0, f"distributed.timeout_s must be > 0, got {self.timeout_s}"),
                (
                    not self.shard_frozen or self.engine == "fsdp2",
                    f"distributed.shard_frozen needs distributed.engine=fsdp2, got {self.engine!r}",
                ),
            ]
        )
