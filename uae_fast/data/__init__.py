"""Input data: robust image loading and the bundled demo photographs."""

from uae_fast.data.demo import DEMO_IMAGE_NAMES, demo_images
from uae_fast.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_EXTENSIONS,
    MAX_ASPECT_RATIO,
    ImageSource,
    LoadedImage,
    Skipped,
    list_image_files,
    load_image,
    load_images,
)

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DEMO_IMAGE_NAMES",
    "IMAGE_EXTENSIONS",
    "MAX_ASPECT_RATIO",
    "ImageSource",
    "LoadedImage",
    "Skipped",
    "demo_images",
    "list_image_files",
    "load_image",
    "load_images",
]
