"""Training configuration: one dataclass tree, loaded from YAML presets plus dotted `key=value` overrides.

Field names follow TRL's `GRPOConfig` where the concept is the same (`num_generations`, `beta`, `epsilon`,
`loss_type`, `scale_rewards`, `max_completion_length`, `num_iterations`, `max_grad_norm`). `batch_size` counts
completions per step, as TRL's, so it must be a multiple of `num_generations`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..config import apply_overrides, from_dict, load_yaml, to_dict
from ..data.images import DEFAULT_MAX_IMAGE_PIXELS
from ..errors import ConfigError
from ..rewards.config import RewardConfig
from ..rl.config import GRPOLossConfig

__all__ = [
    "STAGES",
    "DataConfig",
    "DecoderConfig",
    "LoraSettings",
    "TrainConfig",
    "load_train_config",
    "config_dir",
    "shipped_configs",
]

STAGES = ("g4u",)
SCHEDULERS = ("constant", "linear", "cosine")
DECODERS = ("auto", "dali", "dali-cpu", "dali-mixed", "cpu")


@dataclass
class DataConfig:
    images: str = field(
        default="demo", metadata={"help": "folder of training images, or 'demo' for the bundled photographs"}
    )
    shuffle: bool = field(default=True, metadata={"help": "reshuffle the images every epoch (seeded)"})
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
        if not self.images:
            raise ConfigError("no training data: set data.images=/path/to/folder (or data.images=demo)")

    @property
    def demo(self) -> bool:
        return self.images == "demo"


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
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.reward is None:
            if self.model != "tiny":
                raise ConfigError(
                    "reward is not set: give reward.weights and reward.backbones (local folders of the feature "
                    "models), e.g. reward.weights={dinov2: 1.0} reward.backbones={dinov2: /models/dinov2-large}"
                )
            self.reward = RewardConfig(weights={"dinov2": 1.0}, backbones={"dinov2": "tiny"})
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
