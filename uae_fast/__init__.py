"""uae_fast: train and evaluate Unified Auto-Encoders (Qwen2.5-VL captioner + SD3.5 decoder, Unified-GRPO)."""

from .api import UAE, InferenceDefaults, Reconstruction, load
from .errors import CheckpointError, ConfigError, ImageLoadError, OutputError, UAEError

__version__ = "0.1.0"

__all__ = [
    "UAE",
    "InferenceDefaults",
    "Reconstruction",
    "load",
    "UAEError",
    "ImageLoadError",
    "CheckpointError",
    "ConfigError",
    "OutputError",
    "__version__",
]
