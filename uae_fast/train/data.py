"""Training images: a folder (or the demo photographs), a seeded order per epoch, and a resumable position.

Images are decoded when a batch is drawn, so a bad file is found mid-run: it is skipped and counted (or aborts the
run, as configured) and the batch is filled from the next images. The position (epoch, index) is all a resume
needs: the order of epoch e is a permutation drawn from (seed, e) alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..data.images import list_image_files, load_image
from ..errors import ConfigError, ImageLoadError
from .config import DataConfig

__all__ = ["TrainImage", "ImageDataset"]


@dataclass
class TrainImage:
    key: str  # stable id: the file name (cache key of the reward's source features)
    image: Image.Image
    reference_caption: str | None = None  # from a sidecar <stem>.txt, when the dataset has one


@dataclass
class ImageDataset:
    """Images to train on, drawn in batches in a seeded per-epoch order."""

    config: DataConfig
    seed: int = 0
    epoch: int = 0
    index: int = 0  # position inside the epoch's order
    skipped: list[dict] = field(default_factory=list)  # {"image", "reason"} of every image that failed to load
    _sources: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        if self.config.demo:
            from ..data.demo import demo_images

            self._sources = [(im.name, im.image) for im in demo_images()]
        else:
            try:
                self._sources = [(p.name, p) for p in list_image_files(self.config.images)]
            except ImageLoadError as exc:
                raise ConfigError(f"data.images: {exc}") from None
        if not self._sources:
            raise ConfigError("the training dataset is empty")

    def __len__(self) -> int:
        return len(self._sources)

    def _order(self, epoch: int) -> list[int]:
        if not self.config.shuffle:
            return list(range(len(self._sources)))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self._sources), generator=generator).tolist()

    def next_batch(self, size: int) -> list[TrainImage]:
        """The next `size` loadable images, wrapping into new epochs; bad ones are skipped and counted.

        Raises:
            ImageLoadError: an image failed and `on_bad_image` is 'abort'.
            ConfigError: a whole epoch passed without one loadable image.
        """
        batch: list[TrainImage] = []
        failures_in_a_row = 0
        while len(batch) < size:
            if self.index >= len(self._sources):
                self.epoch, self.index = self.epoch + 1, 0
            key, source = self._sources[self._order(self.epoch)[self.index]]
            self.index += 1
            try:
                image = load_image(source, max_pixels=self.config.max_image_pixels, name=key)
            except ImageLoadError as exc:
                if self.config.on_bad_image == "abort":
                    raise ImageLoadError(f"{exc} (set data.on_bad_image=skip to skip bad images)") from None
                self.skipped.append({"image": key, "reason": str(exc)})
                failures_in_a_row += 1
                if failures_in_a_row >= len(self._sources):
                    raise ConfigError(f"none of the {len(self._sources)} training images can be loaded") from None
                continue
            failures_in_a_row = 0
            batch.append(TrainImage(key, image, _reference_caption(source)))
        return batch

    def preview(self, count: int) -> list[TrainImage]:
        """The first `count` loadable images in file order (for reports; does not move the position)."""
        out = []
        for key, source in self._sources:
            if len(out) == count:
                break
            try:
                out.append(TrainImage(key, load_image(source, max_pixels=self.config.max_image_pixels, name=key),
                                      _reference_caption(source)))  # fmt: skip
            except ImageLoadError:
                continue
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "num_images": len(self._sources), "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        if state["num_images"] != len(self._sources):
            raise ConfigError(
                f"the resumed run had {state['num_images']} training images, this dataset has {len(self._sources)}"
            )
        self.epoch, self.index, self.skipped = state["epoch"], state["index"], list(state["skipped"])


def _reference_caption(source) -> str | None:
    """A caption stored next to the image as <stem>.txt (LongCap-style datasets ship them), else None."""
    if not isinstance(source, Path):
        return None
    sidecar = source.with_suffix(".txt")
    return sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else None
