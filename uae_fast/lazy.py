"""Package attributes that load on first use, so that light entry points (`uae-fast --help`, config validation)
never import torch, transformers or diffusers."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """Module-level `__getattr__` and `__dir__` for `package`: attribute `name` is imported from submodule
    `package.<exports[name]>` the first time it is asked for, then cached in the package.

    Use: `__getattr__, __dir__ = lazy_exports(__name__, {"RewardConfig": "config", ...})`.
    """
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(f".{exports[name]}", package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
