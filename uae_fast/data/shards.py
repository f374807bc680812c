"""Training pairs from shards: a seeded, resumable, rank-split stream of (image, long caption) with a shuffle
buffer and optional aspect-ratio buckets, decoded through the one native data path.

Order of an epoch e on rank r: the shards in a permutation drawn from (seed, e), every `world_size`-th from `rank`
(ranks read disjoint shards whose union is all); their samples stream through a buffer of `data.shuffle_buffer`
samples, from which draw k takes the slot `hash(seed, e, r, k) mod len(buffer)`. The order is a pure function of
those numbers, so the position — shard cursor, the buffer's samples named by (shard, index), draws, pending
buckets — is all a resume needs: it re-reads only the shards those samples came from (a resumed run draws exactly
the batches the uninterrupted run would have).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, ImageLoadError
from .decode import ImageDecoder
from .shard_io import RawSample, SampleProblem, resolve_shards, sample_caption

__all__ = ["ASPECT_RATIOS", "ShardDataset", "aspect_bucket", "bucket_index"]

# Bucket ratios height:width, portrait to landscape (SDXL-style); a bucket is the nearest ratio in log space.
ASPECT_RATIOS = ((2, 1), (16, 9), (3, 2), (4, 3), (1, 1), (3, 4), (2, 3), (9, 16), (1, 2))
_MASK = (1 << 64) - 1


def bucket_index(height: int, width: int) -> int:
    """Index in :data:`ASPECT_RATIOS` of the ratio nearest to height / width (in log space)."""
    if height < 1 or width < 1:
        raise ValueError(f"image sides must be positive, got {height}x{width}")
    target = math.log(height / width)
    return min(
        range(len(ASPECT_RATIOS)), key=lambda i: abs(math.log(ASPECT_RATIOS[i][0] / ASPECT_RATIOS[i][1]) - target)
    )


def aspect_bucket(height: int, width: int, side: int) -> tuple[int, int]:
    """The bucket shape (H, W) of an image at resolution `side`: the nearest ratio of :data:`ASPECT_RATIOS`, area
    ≈ side², both sides multiples of 64. Images of one bucket get the same shape at a given side.

    Args:
        height, width: the image's size (any units; only the ratio matters).
        side: the square resolution the area follows (e.g. 512 or 1024), >= 64.
    """
    if side < 64:
        raise ValueError(f"side must be >= 64, got {side}")
    h, w = ASPECT_RATIOS[bucket_index(height, width)]
    scale = math.sqrt(h / w)
    return max(64, round(side * scale / 64) * 64), max(64, round(side / scale / 64) * 64)


def _mix(*values: int) -> int:
    """splitmix64 over the values: a stateless, platform-independent draw (nothing to checkpoint but a counter)."""
    h = 0
    for v in values:
        z = (h + (v & _MASK) + 0x9E3779B97F4A7C15) & _MASK
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        h = z ^ (z >> 31)
    return h


@dataclass
class _Item:
    shard: int  # index into ShardDataset.shards
    index: int  # the sample's position in its shard
    label: str  # shard/key
    key: str
    image: bytes
    caption: str


class ShardDataset:
    """Image-caption pairs from shards, drawn in batches; the interface of :class:`uae_fast.train.data.ImageDataset`.

    Args:
        config: the `data` section (`shards`, `shuffle`, `shuffle_buffer`, `aspect_buckets`, `on_bad_image`, decoder).
        seed: the run's seed (shard order and buffer draws).
        rank, world_size: this process's share of the shards.

    Raises:
        ConfigError: no shards, fewer shards than ranks, or a bad rank.
    """

    def __init__(self, config, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in 0..world_size-1, got rank {rank} of {world_size}")
        self.config, self.seed, self.rank, self.world_size = config, int(seed), rank, world_size
        self.shards = resolve_shards(config.shards, min_count=world_size)
        if len(self.shards) < world_size:
            raise ConfigError(f"{len(self.shards)} shard(s) cannot be split across {world_size} ranks: need >= 1 each")
        self.decoder = ImageDecoder(config.decoder, threads=config.decode_threads, max_pixels=config.max_image_pixels)
        self.skipped: list[dict] = []  # {"image" or "source", "reason"}, each bad sample once
        self._recorded: set[tuple[str, str]] = set()
        self._pending: dict[int, list[tuple[_Item, np.ndarray]]] = {}  # aspect bucket -> decoded samples
        self._begin_epoch(0)

    # ------------------------------------------------------------------ the stream
    def _epoch_shards(self, epoch: int) -> list[int]:
        order = list(range(len(self.shards)))
        if self.config.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(order), generator=generator).tolist()
        return order[self.rank :: self.world_size]

    def _begin_epoch(self, epoch: int) -> None:
        self.epoch, self._order = epoch, self._epoch_shards(epoch)
        self._pos = self._consumed = self._draws = self._good = 0
        self._stream, self._buffer = None, []

    def _open(self, pos: int):
        return iter(self.shards[self._order[pos]].samples())

    def _next_raw(self) -> RawSample | None:
        while self._pos < len(self._order):
            if self._stream is None:
                self._stream = self._open(self._pos)
            raw = next(self._stream, None)
            if raw is not None:
                self._consumed += 1
                return raw
            self._pos, self._consumed, self._stream = self._pos + 1, 0, None
        return None

    def _accept(self, shard: int, raw: RawSample, record: bool = True) -> _Item | None:
        try:
            caption, problem = sample_caption(raw), None
        except SampleProblem as exc:
            caption, problem = None, str(exc)
        if problem is not None:
            if record:
                self._skip("source", raw.label, problem)
            return None
        return _Item(shard, raw.index, raw.label, raw.key, raw.image, caption)

    def _skip(self, what: str, label: str, reason: str) -> None:
        if self.config.on_bad_image == "abort":
            raise ImageLoadError(f"{reason} (set data.on_bad_image=skip to skip bad samples)")
        if (label, reason) not in self._recorded:
            self._recorded.add((label, reason))
            self.skipped.append({what: label, "reason": reason})

    def _draw(self) -> _Item | None:
        """The next sample of this epoch from the shuffle buffer, or None at the epoch's end."""
        capacity = self.config.shuffle_buffer if self.config.shuffle else 1
        while len(self._buffer) < capacity:
            raw = self._next_raw()
            if raw is None:
                break
            item = self._accept(self._order[self._pos], raw)
            if item is not None:
                self._buffer.append(item)
        if not self._buffer:
            return None
        slot = _mix(self.seed, self.epoch, self.rank, self._draws) % len(self._buffer)
        self._buffer[slot], self._buffer[-1] = self._buffer[-1], self._buffer[slot]
        self._draws += 1
        return self._buffer.pop()

    def _draw_decoded(self, count: int) -> tuple[list[tuple[_Item, np.ndarray]], bool]:
        """Up to `count` decoded samples of this epoch (bad ones skipped) and whether the epoch ended."""
        items = []
        while len(items) < count:
            item = self._draw()
            if item is None:
                break
            items.append(item)
        out = []
        for item, pixels in zip(items, self._decode(items)):
            if isinstance(pixels, ImageLoadError):
                self._skip("image", item.label, str(pixels))
                continue
            self._good += 1
            out.append((item, pixels))
        return out, len(items) < count

    def _decode(self, items: list[_Item]) -> list:
        from ..train.data import decode_named  # the one decode-with-culprit path (lazy: avoids an import cycle)

        return decode_named(self.decoder, [it.image for it in items], [it.label for it in items]) if items else []

    def _end_epoch(self) -> None:
        if self._good == 0:
            first = f"; first: {self.skipped[0]['reason']}" if self.skipped else ""
            raise ConfigError(
                f"no usable image-caption pair in the {len(self._order)} shard(s) of rank {self.rank} "
                f"({len(self.skipped)} skipped{first})"
            )
        self._begin_epoch(self.epoch + 1)

    # ------------------------------------------------------------------ the dataset interface
    def next_batch(self, size: int) -> list:
        """The next `size` usable pairs as TrainImage (key, pixels [H, W, 3] uint8, reference_caption), wrapping
        into new epochs; with `data.aspect_buckets` all of one aspect bucket. Bad samples are skipped and counted.

        Raises:
            ImageLoadError: a sample failed and `on_bad_image` is 'abort'.
            ConfigError: a whole epoch passed without one usable pair.
        """
        from ..train.data import TrainImage

        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        picked = self._next_bucket(size) if self.config.aspect_buckets else self._next_plain(size)
        return [TrainImage(item.key, pixels, item.caption) for item, pixels in picked]

    def _next_plain(self, size: int) -> list[tuple[_Item, np.ndarray]]:
        batch: list[tuple[_Item, np.ndarray]] = []
        while len(batch) < size:
            decoded, ended = self._draw_decoded(size - len(batch))
            batch += decoded
            if ended:
                self._end_epoch()
        return batch

    def _next_bucket(self, size: int) -> list[tuple[_Item, np.ndarray]]:
        while True:
            for bucket, members in self._pending.items():  # insertion order: restored exactly on resume
                if len(members) >= size:
                    if len(members) == size:
                        del self._pending[bucket]
                    else:
                        self._pending[bucket] = members[size:]
                    return members[:size]
            decoded, ended = self._draw_decoded(size)
            for item, pixels in decoded:
                self._pending.setdefault(bucket_index(*pixels.shape[:2]), []).append((item, pixels))
            if ended:
                self._end_epoch()

    def preview(self, count: int) -> list:
        """The first `count` usable pairs in shard order (for reports; does not move the position)."""
        from ..train.data import TrainImage

        out = []
        for shard_id, shard in enumerate(self.shards):
            for raw in shard.samples():
                if len(out) == count:
                    return out
                item = self._accept(shard_id, raw, record=False)
                if item is not None:
                    pixels = self._decode([item])[0]
                    if not isinstance(pixels, ImageLoadError):
                        out.append(TrainImage(item.key, pixels, item.caption))
        return out

    def state_dict(self) -> dict:
        return {
            "kind": "shards",
            "shards": [s.fingerprint() for s in self.shards],
            "rank": self.rank,
            "world_size": self.world_size,
            "epoch": self.epoch,
            "cursor": [self._pos, self._consumed],
            "draws": self._draws,
            "good": self._good,
            "buffer": [[it.shard, it.index] for it in self._buffer],
            "pending": [
                [bucket, [[it.shard, it.index] for it, _ in members]] for bucket, members in self._pending.items()
            ],
            "skipped": list(self.skipped),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the position: re-reads the shards the buffered samples came from, then seeks the open shard.

        Raises:
            ConfigError: the checkpoint is not of these shards, ranks or world size.
        """
        if state.get("kind") != "shards":
            raise ConfigError("the resumed run trained on data.images, this run on data.shards")
        if state["shards"] != [s.fingerprint() for s in self.shards]:
            raise ConfigError("the shards changed since the checkpoint (names or sizes differ); resume needs the same")
        if [state["rank"], state["world_size"]] != [self.rank, self.world_size]:
            raise ConfigError(
                f"the checkpoint is rank {state['rank']} of {state['world_size']}, this run rank {self.rank} of "
                f"{self.world_size}; exact resume needs the same split"
            )
        self._begin_epoch(state["epoch"])
        self._pos, self._consumed = state["cursor"]
        self._draws, self._good = state["draws"], state["good"]
        self.skipped = list(state["skipped"])
        self._recorded = {(s.get("image", s.get("source")), s["reason"]) for s in self.skipped}
        refs = [tuple(r) for r in state["buffer"]] + [tuple(r) for _, rs in state["pending"] for r in rs]
        found = self._reread(refs)
        self._buffer = [found[tuple(r)] for r in state["buffer"]]
        self._pending = {}
        for bucket, members in state["pending"]:
            items = [found[tuple(r)] for r in members]
            decoded = self._decode(items)
            if any(isinstance(px, ImageLoadError) for px in decoded):
                raise ConfigError("an image decoded before the checkpoint fails now: the shards changed")
            self._pending[bucket] = list(zip(items, decoded))
        if self._pos < len(self._order):
            self._stream = self._open(self._pos)
            for _ in range(self._consumed):
                next(self._stream, None)

    def _reread(self, refs: list[tuple[int, int]]) -> dict[tuple[int, int], _Item]:
        wanted: dict[int, set[int]] = {}
        for shard, index in refs:
            wanted.setdefault(shard, set()).add(index)
        found = {}
        for shard, indices in wanted.items():
            for raw in self.shards[shard].samples():
                if raw.index in indices:
                    item = self._accept(shard, raw, record=False)
                    if item is not None:
                        found[(shard, raw.index)] = item
                if raw.index >= max(indices):
                    break
        missing = [r for r in refs if r not in found]
        if missing:
            raise ConfigError(f"shard {self.shards[missing[0][0]].name} changed since the checkpoint")
        return found
