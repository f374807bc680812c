"""Seeds derived from the run seed and a position (step, chunk, image…): stable across runs and machines, unlike
`hash()`, so a resumed run draws exactly what the uninterrupted one would have."""

from __future__ import annotations

import zlib

__all__ = ["stable_seed"]


def stable_seed(*parts: int) -> int:
    """A 63-bit seed from integers."""
    return zlib.crc32(repr(parts).encode()) * 2654435761 % (2**63)
