"""Training configuration: one dataclass tree, loaded from YAML presets plus dotted `key=value` overrides.

Field names follow TRL's `GRPOConfig` where the concept is the same (`num_generations`, `beta`, `epsilon`,
`loss_type`, `scale_rewards`, `max_completion_length`, `num_iterations`, `max_grad_norm`). `batch_size` counts
completions per step, as TRL's, so it must be a multiple of `num_generations`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..config import apply_overrides, check_all, from_dict, load_yaml, to_dict
from ..data.images import DEFAULT_MAX_IMAGE_PIXELS
from ..errors import ConfigError
from ..rewards.config import RewardConfig
from ..rl.config import SCALE_REWARDS, SDE_TYPES, GRPOLossConfig
from .settings import (
    DIT_ATTENTION_PROJECTIONS,
    ColdStartSettings,
    DistributedSettings,
    LoraSettings,
    PretrainSettings,
)

__all__ = [
    "STAGES",
    "DataConfig",
    "DecoderConfig",
    "ColdStartSettings",
    "LoraSettings",
    "PretrainSettings",
    "TrainConfig",
    "U4GSettings",
    "UnifiedSettings",
    "load_train_config",
    "config_dir",
    "shipped_configs",
]

STAGES = ("g4u", "u4g", "unified", "pretrain", "cold_start")
SCHEDULERS = ("constant", "linear", "cosine")
DECODERS = ("auto", "dali", "dali-cpu", "dali-mixed", "cpu")


@dataclass
class DataConfig:
    images: str = field(
        default="demo", metadata={"help": "folder of training images, or 'demo' for the bundled photographs"}
    )
    shards: str | None = field(
        default=None,
        metadata={"help": "image-caption pairs instead of data.images: a folder of WebDataset .tar shards, a brace "
                  "pattern (/data/shard-{000000..000099}.tar), or a folder with captions.jsonl"},
    )  # fmt: skip
    shuffle: bool = field(default=True, metadata={"help": "reshuffle the images every epoch (seeded)"})
    shuffle_buffer: int = field(default=1000, metadata={"help": "shards: samples in the shuffle buffer"})
    aspect_buckets: bool = field(
        default=False,
        metadata={"help": "shards: form each batch from images of one aspect-ratio bucket (uae_fast.data.shards."
                  "aspect_bucket gives the bucket's shape at a resolution)"},
    )  # fmt: skip
    on_bad_image: str = field(default="skip", metadata={"help": "'skip' (count and go on) or 'abort'"})
    max_image_pixels: int = field(default=DEFAULT_MAX_IMAGE_PIXELS, metadata={"help": "refuse larger images"})
    decoder: str = field(
        default="auto",
        metadata={"help": "image decoder: 'auto' (DALI when installed, nvJPEG on a GPU; else libjpeg-turbo/Pillow), "
                  "'dali', 'dali-cpu', 'dali-mixed' or 'cpu'"},
    )  # fmt: skip
    decode_threads: int = field(default=1, metadata={"help": "decoder threads"})

    def __post_init__(self):
        if self.decoder not in DECODERS:
            raise ConfigError(f"data.decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")
        if self.decode_threads < 1:
            raise ConfigError(f"data.decode_threads must be >= 1, got {self.decode_threads}")
        if self.on_bad_image not in ("skip", "abort"):
            raise ConfigError(f"data.on_bad_image must be 'skip' or 'abort', got {self.on_bad_image!r}")
        if not self.images and not self.shards:
            raise ConfigError("no training data: set data.images=/path/to/folder (or data.images=demo)")
        if self.shards and self.images not in ("demo", None, ""):
            raise ConfigError("set data.images or data.shards, not both")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.aspect_buckets and not self.shards:
            raise ConfigError("data.aspect_buckets needs data.shards (image folders are not bucketed)")

    @property
    def demo(self) -> bool:
        return not self.shards and self.images == "demo"


@dataclass
class DecoderConfig:
    steps: int = field(default=40, metadata={"help": "Euler steps of the reconstruction"})
    size: int = field(default=1024, metadata={"help": "reconstruction side in pixels (a multiple of 8)"})
    guidance: float = field(default=5.0, metadata={"help": "CFG scale; <= 1 disables the negative branch"})
    conditioning: str = field(default="llm", metadata={"help": "'llm' (official UAE) or 'text' (vanilla SD3)"})
    adapters_in_conditioning: bool = field(
        default=False,
        metadata={
            "help": "llm mode: condition with the encoder's LoRA enabled. Off by default: the decoder then sees the "
            "frozen base LLM, a stationary reward environment"
        },
    )
    batch_size: int = field(default=16, metadata={"help": "captions per decoder forward (bounds memory)"})
    fixed_noise: bool = field(
        default=False,
        metadata={"help": "reuse each image's initial noise at every step (a deterministic environment); "
                  "the G captions of an image always share one noise"},
    )  # fmt: skip

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError(f"decoder.steps must be >= 1, got {self.steps}")
        if self.size < 8 or self.size % 8:
            raise ConfigError(f"decoder.size must be a positive multiple of 8, got {self.size}")
        if self.conditioning not in ("llm", "text"):
            raise ConfigError(f"decoder.conditioning must be 'llm' or 'text', got {self.conditioning!r}")
        if self.batch_size < 1:
            raise ConfigError(f"decoder.batch_size must be >= 1, got {self.batch_size}")


CAPTION_MODES = ("greedy", "sample")
UNIFIED_SCHEDULES = ("sequential", "alternate")


@dataclass
class U4GSettings:
    """Stage 2b, "understanding for generation": Flow-GRPO on the decoder (flow_grpo's names and SD3 defaults).

    The rendering itself (size, CFG scale, conditioning mode, forward batch) is the `decoder` section's.
    """

    num_generations: int = field(default=8, metadata={"help": "images rendered per caption, from different noise (G)"})
    batch_size: int = field(default=16, metadata={"help": "images rendered per step (captions x num_generations)"})
    captions: str = field(
        default="greedy",
        metadata={"help": "how the frozen captioner captions a training image: 'greedy' (cached for the run) or "
                  "'sample' (temperature/top_p/max_completion_length of the top level; new each epoch)"},
    )  # fmt: skip
    num_steps: int = field(default=10, metadata={"help": "denoising steps of a training rollout"})
    eval_num_steps: int = field(default=40, metadata={"help": "denoising steps of the report's renders"})
    noise_level: float = field(default=0.7, metadata={"help": "SDE noise scale a (sde: σ_t = a·sqrt(σ/(1−σ)))"})
    sde_type: str = field(default="sde", metadata={"help": f"the stochastic sampler, one of {SDE_TYPES}"})
    sde_window_size: int = field(
        default=0, metadata={"help": "Flow-GRPO-Fast: SDE (and training) on this many consecutive steps only, ODE "
                             "elsewhere; 0: every step"}
    )  # fmt: skip
    sde_window_range: list[int] | None = field(
        default=None, metadata={"help": "[lo, hi): the window starts at a random step in lo..hi-size (default all)"}
    )
    same_noise: bool = field(
        default=False,
        metadata={"help": "a caption's G renders start from the same noise (flow_grpo's same_latent) and differ only "
                  "by the SDE noise; default: different noise per render"},
    )  # fmt: skip
    timestep_fraction: float = field(default=1.0, metadata={"help": "fraction of the SDE steps trained on"})
    clip_range: float = field(default=1e-4, metadata={"help": "PPO clip range of the per-step ratio"})
    adv_clip_max: float = field(default=5.0, metadata={"help": "advantages are clipped to ±adv_clip_max"})
    beta: float = field(default=0.04, metadata={"help": "KL coefficient (closed-form Gaussian KL); 0 skips the ref"})
    scale_rewards: str = field(default="group", metadata={"help": f"advantage scaling, one of {SCALE_REWARDS}"})
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate of the DiT LoRA"})
    num_updates: int = field(
        default=1, metadata={"help": "optimizer steps per rollout batch (the batch split into that many parts)"}
    )
    lora: LoraSettings = field(default_factory=LoraSettings)
    lora_targets: list[str] = field(
        default_factory=lambda: list(DIT_ATTENTION_PROJECTIONS),
        metadata={"help": "DiT module names (suffixes) carrying LoRA"},
    )

    def __post_init__(self):
        lo, hi = self.window_range
        checks = [
            (self.num_generations >= 2, f"u4g.num_generations must be >= 2, got {self.num_generations}"),
            (
                self.batch_size >= 1 and self.batch_size % self.num_generations == 0,
                f"u4g.batch_size ({self.batch_size} images per step) must be a positive multiple of "
                f"u4g.num_generations ({self.num_generations})",
            ),
            (self.captions in CAPTION_MODES, f"u4g.captions must be one of {CAPTION_MODES}, got {self.captions!r}"),
            (self.num_steps >= 2, f"u4g.num_steps must be >= 2, got {self.num_steps}"),
            (self.eval_num_steps >= 1, f"u4g.eval_num_steps must be >= 1, got {self.eval_num_steps}"),
            (self.sde_type in SDE_TYPES, f"u4g.sde_type must be one of {SDE_TYPES}, got {self.sde_type!r}"),
            (
                self.noise_level > 0 and (self.sde_type != "cps" or self.noise_level <= 1),
                f"u4g.noise_level must be > 0 (and <= 1 for cps), got {self.noise_level}",
            ),
            (
                0 <= lo < hi <= self.num_steps,
                f"u4g.sde_window_range must be [lo, hi) with 0 <= lo < hi <= num_steps ({self.num_steps}), "
                f"got {self.sde_window_range}",
            ),
            (
                0 <= self.sde_window_size <= hi - lo,
                f"u4g.sde_window_size must be in 0..{hi - lo} (the window range's length), got {self.sde_window_size}",
            ),
            (0 < self.timestep_fraction <= 1, f"u4g.timestep_fraction must be in (0, 1], got {self.timestep_fraction}"),
            (self.clip_range > 0, f"u4g.clip_range must be > 0, got {self.clip_range}"),
            (self.adv_clip_max > 0, f"u4g.adv_clip_max must be > 0, got {self.adv_clip_max}"),
            (self.beta >= 0, f"u4g.beta must be >= 0, got {self.beta}"),
            (
                self.scale_rewards in SCALE_REWARDS,
                f"u4g.scale_rewards must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}",
            ),
            (self.learning_rate > 0, f"u4g.learning_rate must be > 0, got {self.learning_rate}"),
            (
                1 <= self.num_updates <= self.batch_size // self.num_generations,
                f"u4g.num_updates must be in 1..{self.batch_size // self.num_generations} (captions per step), "
                f"got {self.num_updates}",
            ),
            (not self.lora.train_embeddings, "u4g.lora.train_embeddings: the DiT has no token embeddings"),
            (bool(self.lora_targets), "u4g.lora_targets is empty: name the DiT modules to adapt"),
        ]
        check_all(checks)

    @property
    def window_range(self) -> tuple[int, int]:
        if self.sde_window_range is None:
            return 0, self.num_steps
        if len(self.sde_window_range) != 2:
            raise ConfigError(f"u4g.sde_window_range must be [lo, hi], got {self.sde_window_range}")
        return int(self.sde_window_range[0]), int(self.sde_window_range[1])

    @property
    def captions_per_step(self) -> int:
        return self.batch_size // self.num_generations


@dataclass
class UnifiedSettings:
    """Unified-GRPO: stage 2a (the top-level settings) and stage 2b (`u4g`) on one UAE."""

    schedule: str = field(
        default="sequential",
        metadata={"help": f"one of {UNIFIED_SCHEDULES}: 2a for g4u_steps then 2b; or alternating blocks"},
    )
    g4u_steps: int | None = field(
        default=None, metadata={"help": "sequential: steps of stage 2a before stage 2b (default max_steps // 2)"}
    )
    alternate_every: int = field(default=1, metadata={"help": "alternate: steps per block (2a first)"})

    def __post_init__(self):
        if self.schedule not in UNIFIED_SCHEDULES:
            raise ConfigError(f"unified.schedule must be one of {UNIFIED_SCHEDULES}, got {self.schedule!r}")
        if self.g4u_steps is not None and self.g4u_steps < 0:
            raise ConfigError(f"unified.g4u_steps must be >= 0, got {self.g4u_steps}")
        if self.alternate_every < 1:
            raise ConfigError(f"unified.alternate_every must be >= 1, got {self.alternate_every}")

    def stage_at(self, step: int, max_steps: int) -> str:
        """The stage ("g4u" or "u4g") that trains at step `step` (0-based) of a `max_steps` run."""
        if self.schedule == "sequential":
            first = max_steps // 2 if self.g4u_steps is None else self.g4u_steps
            return "g4u" if step < first else "u4g"
        return "g4u" if (step // self.alternate_every) % 2 == 0 else "u4g"


@dataclass
class TrainConfig:
    """Everything a training run needs; `uae-fast train --preset tiny key=value ...` builds one."""

    stage: str = field(default="g4u", metadata={"help": f"training stage, one of {STAGES}"})
    model: str = field(default="tiny", metadata={"help": "preset name (tiny, uae-3b) or checkpoint folder"})
    output_dir: str | None = field(default=None, metadata={"help": "run folder (checkpoints, metrics, report)"})
    seed: int = field(default=0, metadata={"help": "seeds the model preset, data order, sampling and noise"})
    device: str | None = field(default=None, metadata={"help": "cuda / cpu (default: cuda when available)"})
    data: DataConfig = field(default_factory=DataConfig)
    # rollout
    batch_size: int = field(default=32, metadata={"help": "completions per step (images x num_generations)"})
    num_generations: int = field(default=8, metadata={"help": "captions sampled per image (G)"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature (also scales the loss logits)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    max_completion_length: int = field(default=512, metadata={"help": "max new tokens per caption"})
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    reward: RewardConfig | None = field(
        default=None, metadata={"help": "reconstruction reward (default for the tiny model: the tiny DINOv2)"}
    )
    # update
    lora: LoraSettings = field(default_factory=LoraSettings)
    loss: GRPOLossConfig = field(default_factory=GRPOLossConfig)
    u4g: U4GSettings = field(default_factory=U4GSettings, metadata={"help": "stage 2b (Flow-GRPO on the decoder)"})
    unified: UnifiedSettings = field(default_factory=UnifiedSettings, metadata={"help": "the Unified-GRPO schedule"})
    pretrain: PretrainSettings = field(
        default_factory=PretrainSettings, metadata={"help": "stage 1 (rectified-flow pretraining of the decoder)"}
    )
    cold_start: ColdStartSettings = field(
        default_factory=ColdStartSettings, metadata={"help": "the cold start (differentiable reconstruction)"}
    )
    distributed: DistributedSettings = field(
        default_factory=DistributedSettings, metadata={"help": "multi-process runs (torchrun / deepspeed launchers)"}
    )
    num_iterations: int = field(
        default=1, metadata={"help": "optimizer steps per rollout batch (old log-probs if > 1)"}
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "rollout batches per optimizer step"})
    micro_batch_tokens: int = field(default=8192, metadata={"help": "token budget of one forward/backward pass"})
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata={"help": "AdamW betas"})
    lr_scheduler: str = field(default="constant", metadata={"help": f"one of {SCHEDULERS} (after warmup)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 disables)"})
    max_steps: int = field(default=100, metadata={"help": "training steps (a rollout batch and its update each)"})
    negate_advantages: bool = field(
        default=False, metadata={"help": "control experiment: train on -A (a run that must NOT improve the reward)"}
    )
    # bookkeeping
    logging_steps: int = field(default=1, metadata={"help": "log metrics every n steps"})
    save_steps: int = field(default=0, metadata={"help": "checkpoint every n steps (0: only at the end)"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept (older ones deleted)"})
    report_images: int = field(default=4, metadata={"help": "images in the final reconstruction report (0: none)"})
    tensorboard: bool = field(default=True, metadata={"help": "write TensorBoard event files"})
    resume: str | None = field(
        default=None, metadata={"help": "'auto' (latest checkpoint in output_dir) or a checkpoint folder"}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "replace an earlier run in output_dir (otherwise a run folder is refused)"}
    )
    save_final_model: bool = field(
        default=True, metadata={"help": "write output_dir/final/ in the released layout (loadable by uae_fast.load)"}
    )

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ConfigError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.num_generations < 2:
            raise ConfigError(f"num_generations must be >= 2 (GRPO compares captions of one image), got "
                              f"{self.num_generations}")  # fmt: skip
        if self.batch_size < 1 or self.batch_size % self.num_generations:
            raise ConfigError(
                f"batch_size ({self.batch_size} completions per step) must be a positive multiple of "
                f"num_generations ({self.num_generations}): e.g. batch_size={4 * self.num_generations} for 4 images"
            )
        checks = [
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.max_completion_length >= 1, "max_completion_length must be >= 1"),
            (self.num_iterations >= 1, f"num_iterations must be >= 1, got {self.num_iterations}"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
            (self.micro_batch_tokens >= 1, "micro_batch_tokens must be >= 1"),
            (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
            (len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "adam_betas must be [b1, b2]"),
            (self.lr_scheduler in SCHEDULERS, f"lr_scheduler must be one of {SCHEDULERS}, got {self.lr_scheduler!r}"),
            (self.warmup_steps >= 0 and self.max_grad_norm >= 0, "warmup_steps and max_grad_norm must be >= 0"),
            (self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.logging_steps >= 1 and self.save_steps >= 0, "logging_steps must be >= 1, save_steps >= 0"),
            (self.save_total_limit >= 1, "save_total_limit must be >= 1"),
            (
                not self.distributed.shard_frozen or self.stage in ("g4u", "u4g"),
                "distributed.shard_frozen shards the frozen model of stage g4u (the decoder) or u4g (the captioner), "
                f"got stage {self.stage!r}",
            ),
        ]
        check_all(checks)
        sequential = self.stage == "unified" and self.unified.schedule == "sequential"
        if sequential and (self.unified.g4u_steps or 0) > self.max_steps:
            raise ConfigError(f"unified.g4u_steps ({self.unified.g4u_steps}) is more than max_steps ({self.max_steps})")
        if self.reward is None:
            if self.model != "tiny":
                raise ConfigError(
                    "reward is not set: give reward.weights and reward.backbones (local folders of the feature "
                    "models), e.g. reward.weights={dinov2: 1.0} reward.backbones={dinov2: /models/dinov2-large}"
                )
            self.reward = RewardConfig(weights={"dinov2": 1.0}, backbones={"dinov2": "tiny"})
        if self.stage == "cold_start" and self.cold_start.backbone not in self.reward.backbones:
            raise ConfigError(
                f"cold_start.backbone {self.cold_start.backbone!r} has no folder in reward.backbones "
                f"(it has {', '.join(self.reward.backbones)})"
            )
        # The loss scales logits by the sampling temperature and dr_grpo divides by the max length: one value each.
        for name in ("temperature", "max_completion_length"):
            set_in_loss = getattr(self.loss, name)
            if set_in_loss != getattr(GRPOLossConfig, name) and set_in_loss != getattr(self, name):
                raise ConfigError(f"set {name} at the top level, not as loss.{name} (the loss uses the sampling value)")
            setattr(self.loss, name, getattr(self, name))

    @property
    def images_per_step(self) -> int:
        return self.batch_size // self.num_generations

    @classmethod
    def from_dict(cls, data: dict | None) -> TrainConfig:
        return from_dict(cls, data)

    def to_dict(self) -> dict:
        return to_dict(self)


def config_dir() -> Path:
    """Folder of the shipped YAML configs (the repo's configs/, installed as uae_fast/train/configs)."""
    return Path(str(resources.files("uae_fast.train") / "configs"))


def shipped_configs() -> dict[str, Path]:
    """Shipped config name → YAML path (`uae-fast train --config tiny` is `--config <config_dir>/g4u_tiny.yaml`)."""
    return {p.stem: p for p in sorted(config_dir().glob("*.yaml"))}


def load_train_config(source: str | Path | dict | None = None, overrides: list[str] | tuple = ()) -> TrainConfig:
    """A config from a YAML path, a shipped config name (e.g. `g4u_tiny`), a dict or None, plus overrides."""
    if isinstance(source, dict) or source is None:
        data = dict(source or {})
    else:
        named = shipped_configs().get(str(source))
        data = load_yaml(named if named is not None else source)
    return TrainConfig.from_dict(apply_overrides(data, list(overrides)))
