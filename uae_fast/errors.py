"""Exceptions that carry a one-line, user-facing message.

The CLI prints ``str(error)`` of any :class:`UAEError` as a single line and exits with status 2; anything else is a
bug and keeps its traceback. Messages name the offending file, field or value and say what to change.
"""

from __future__ import annotations

__all__ = ["UAEError", "ImageLoadError", "CheckpointError", "ConfigError", "DistributedError", "OutputError"]


class UAEError(Exception):
    """Base class for errors caused by user input rather than by a bug."""


class ImageLoadError(UAEError, ValueError):
    """An image file (or bytes) cannot be used: missing, not an image, truncated, too large, odd geometry."""


class CheckpointError(UAEError, FileNotFoundError):
    """A checkpoint folder or one of its components is missing or inconsistent."""


class ConfigError(UAEError, ValueError):
    """A configuration value is invalid."""


class OutputError(UAEError, OSError):
    """An output location cannot be written (e.g. the output folder is an existing file)."""


class DistributedError(UAEError, RuntimeError):
    """A rank of a distributed run lost the others: one died or hangs past `distributed.timeout_s`."""
