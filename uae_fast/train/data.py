"""Training images: file bytes → one decode per step (the native data path) → the policy and the reward.

Images are read as bytes and decoded when a batch is drawn, by :class:`uae_fast.data.decode.ImageDecoder` (DALI
when installed — nvJPEG on a GPU —, else libjpeg-turbo / Pillow), into uint8 [H, W, 3] arrays that both the
captioner's C++ preprocessing and the reward's on-device preprocessing take: each image is decoded once per step.
A bad file is found mid-run: it is skipped and counted (or aborts the run, as configured) and the batch is filled
from the next images. The position (epoch, index) is all a resume needs: the order of epoch e is a permutation drawn
from (seed, e) alone.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.decode import ImageDecoder
from ..data.images import list_image_files
from ..errors import ConfigError, ImageLoadError
from .config import DataConfig

__all__ = ["TrainImage", "ImageDataset", "decode_named", "open_dataset"]


@dataclass
class TrainImage:
    key: str  # stable id: the file name (cache key of the reward's source features)
    pixels: np.ndarray  # [H, W, 3] uint8 RGB, decoded once for the policy and the reward
    reference_caption: str | None = None  # the pair's caption: shards, a sidecar <stem>.txt, the demo's captions


@dataclass
class ImageDataset:
    """Images to train on, drawn in batches in a seeded per-epoch order.

    The order is one stream (epoch after epoch, each a permutation drawn from (seed, epoch)) whatever the world
    size: rank r of W draws the stream's entries r, r + W, r + 2W, ... — so W ranks drawing B images each draw the
    same B·W images as one process drawing B·W, and a run resumes on another world size where it stopped.
    """

    config: DataConfig
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    draws: int = 0  # entries of the stream this rank has drawn
    skipped: list[dict] = field(default_factory=list)  # {"image", "reason"} of every image that failed to load
    _sources: list = field(default_factory=list, init=False, repr=False)  # (key, Path or encoded bytes)
    _captions: dict = field(default_factory=dict, init=False, repr=False)  # key -> caption of in-memory images

    def __post_init__(self):
        if self.config.demo:
            from ..data.demo import DEMO_CAPTIONS, demo_images

            self._sources = [(im.name, _png_bytes(im.image)) for im in demo_images()]  # lossless: same pixels
            self._captions = dict(DEMO_CAPTIONS)
        else:
            try:
                self._sources = [(p.name, p) for p in list_image_files(self.config.images)]
            except ImageLoadError as exc:
                raise ConfigError(f"data.images: {exc}") from None
        if not self._sources:
            raise ConfigError("the training dataset is empty")
        self.decoder = ImageDecoder(
            self.config.decoder, threads=self.config.decode_threads, max_pixels=self.config.max_image_pixels
        )

    def __len__(self) -> int:
        return len(self._sources)

    def _order(self, epoch: int) -> list[int]:
        if not self.config.shuffle:
            return list(range(len(self._sources)))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self._sources), generator=generator).tolist()

    @property
    def position(self) -> int:
        """Index in the stream of this rank's next image."""
        return self.draws * self.world_size + self.rank

    @property
    def epoch(self) -> int:
        """The epoch of the last image drawn (0 before the first)."""
        return max(self.position - self.world_size, 0) // len(self._sources)

    def _draw(self) -> tuple[str, object]:
        epoch, index = divmod(self.position, len(self._sources))
        self.draws += 1
        return self._sources[self._order(epoch)[index]]

    def next_batch(self, size: int) -> list[TrainImage]:
        """The next `size` decodable images, wrapping into new epochs; bad ones are skipped and counted.

        Raises:
            ImageLoadError: an image failed and `on_bad_image` is 'abort'.
            ConfigError: a whole epoch passed without one decodable image.
        """
        batch: list[TrainImage] = []
        failures_in_a_row = 0
        while len(batch) < size:
            drawn = [self._draw() for _ in range(size - len(batch))]
            decoded = self._decode([source for _, source in drawn], [key for key, _ in drawn])
            for (key, source), pixels in zip(drawn, decoded):
                if isinstance(pixels, ImageLoadError):
                    if self.config.on_bad_image == "abort":
                        raise ImageLoadError(f"{pixels} (set data.on_bad_image=skip to skip bad images)") from None
                    self.skipped.append({"image": key, "reason": str(pixels)})
                    failures_in_a_row += 1
                    if failures_in_a_row >= len(self._sources):
                        raise ConfigError(f"none of the {len(self._sources)} training images can be loaded")
                    continue
                failures_in_a_row = 0
                batch.append(TrainImage(key, pixels, self._caption(key, source)))
        return batch

    def _decode(self, sources: list, keys: list[str]) -> list[np.ndarray | ImageLoadError]:
        return decode_named(self.decoder, sources, keys)

    def preview(self, count: int) -> list[TrainImage]:
        """The first `count` decodable images in file order (for reports; does not move the position)."""
        out = []
        for key, source in self._sources:
            if len(out) == count:
                break
            pixels = self._decode([source], [key])[0]
            if not isinstance(pixels, ImageLoadError):
                out.append(TrainImage(key, pixels, self._caption(key, source)))
        return out

    def _caption(self, key: str, source) -> str | None:
        return self._captions.get(key) if not isinstance(source, Path) else _reference_caption(source)

    def state_dict(self) -> dict:
        return {
            "draws": self.draws,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_images": len(self._sources),
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` — this rank's, or rank 0's of a run on another world size (its position in the
        stream carries over exactly when every rank had drawn as many images, i.e. unless images were skipped)."""
        if "num_images" not in state:
            raise ConfigError("the resumed run trained on data.shards, this run on data.images")
        if state["num_images"] != len(self._sources):
            raise ConfigError(
                f"the resumed run had {state['num_images']} training images, this dataset has {len(self._sources)}"
            )
        if "draws" not in state:  # written before ranks: one process at (epoch, index)
            state = {**state, "draws": state["epoch"] * len(self._sources) + state["index"], "world_size": 1}
        if state.get("world_size", 1) == self.world_size:
            self.draws = state["draws"]
        else:
            self.draws = state["draws"] * state["world_size"] // self.world_size
        self.skipped = list(state["skipped"])


def decode_named(decoder: ImageDecoder, sources: list, keys: list[str]) -> list[np.ndarray | ImageLoadError]:
    """Decode a batch in one call; when it fails, decode one by one to tell the bad images from the good.

    Args:
        decoder: the run's decoder (the one native data path).
        sources: N encoded images (bytes) or files (Path).
        keys: N names used in the errors.

    Returns:
        N entries: [H, W, 3] uint8 RGB pixels, or the ImageLoadError (naming the key) of an image that failed.
    """
    blobs = []
    for key, source in zip(keys, sources):
        try:
            blobs.append(source.read_bytes() if isinstance(source, Path) else source)
        except OSError as exc:
            blobs.append(ImageLoadError(f"{key}: cannot be read ({exc.strerror or exc})"))
    if not any(isinstance(b, ImageLoadError) for b in blobs):
        try:
            return decoder.decode(blobs)
        except ImageLoadError:
            pass  # rare: find the culprit below
    out: list[np.ndarray | ImageLoadError] = []
    for key, blob in zip(keys, blobs):
        if isinstance(blob, ImageLoadError):
            out.append(blob)
            continue
        try:
            out.append(decoder.decode([blob])[0])
        except ImageLoadError as exc:  # the decoder says "image 0: ..."; name the file instead
            out.append(ImageLoadError(f"{key}: {str(exc).removeprefix('image 0: ')}"))
    return out


def open_dataset(config: DataConfig, *, seed: int = 0, rank: int = 0, world_size: int = 1):
    """The training data of `config`: a :class:`~uae_fast.data.shards.ShardDataset` over image-caption pairs when
    `data.shards` is set, else an :class:`ImageDataset` over a folder of images (or the demo photographs). Both draw
    `next_batch(size) -> list[TrainImage]` and resume exactly from `state_dict()`.

    Raises:
        ConfigError: no usable data.
    """
    if config.shards:
        from ..data.shards import ShardDataset

        return ShardDataset(config, seed=seed, rank=rank, world_size=world_size)
    return ImageDataset(config, seed=seed, rank=rank, world_size=world_size)


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _reference_caption(source) -> str | None:
    """A caption stored next to the image as <stem>.txt (LongCap-style datasets ship them), else None."""
    if not isinstance(source, Path):
        return None
    sidecar = source.with_suffix(".txt")
    return sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else None
