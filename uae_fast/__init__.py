"""uae_fast: train and evaluate Unified Auto-Encoders (Qwen2.5-VL captioner + SD3.5 decoder, Unified-GRPO)."""

from __future__ import annotations

import importlib

from .errors import CheckpointError, ConfigError, ImageLoadError, OutputError, UAEError
from .lazy import lazy_exports

__version__ = "0.1.0"


def _check_not_source_tree() -> None:
    """Imported from a checkout's source folder (the current directory shadows the install), uae_fast has neither
    its compiled `_C` nor `uae_fast.kernels` (installed from the repo's kernels/): say so in one line instead of a
    ModuleNotFoundError deep inside training."""
    import importlib.util

    if importlib.util.find_spec(f"{__name__}.kernels") is None:
        raise ImportError(
            f"uae_fast is being imported from its source folder {__path__[0]}, which has no compiled extension and "
            "no kernels: run from another directory, or install it in editable mode from the repo root: "
            "pip install scikit-build-core pybind11 && pip install --no-build-isolation -e ."
        )


_check_not_source_tree()

# The API pulls in torch, transformers and diffusers (seconds of imports); load it on first use so that
# `uae-fast --help` and the error types stay instant.
_LAZY = {"UAE": "api", "InferenceDefaults": "api", "Reconstruction": "api", "load": "api"}

__all__ = [
    "UAE",
    "InferenceDefaults",
    "Reconstruction",
    "load",
    "train",
    "UAEError",
    "ImageLoadError",
    "CheckpointError",
    "ConfigError",
    "OutputError",
    "__version__",
]


_lazy_getattr, __dir__ = lazy_exports(__name__, _LAZY)


def __getattr__(name: str):
    if name == "train":  # the training package is callable: uae_fast.train(config)
        return importlib.import_module(".train", __name__)
    return _lazy_getattr(name)
