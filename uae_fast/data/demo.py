"""Real demo photographs bundled with scikit-image, so a first run needs neither internet nor user files."""

from __future__ import annotations

from PIL import Image

from uae_fast.data.images import LoadedImage, load_image
from uae_fast.errors import UAEError

__all__ = ["DEMO_IMAGE_NAMES", "demo_images"]

# All four ship inside the scikit-image wheel (no pooch download) and are 8-bit RGB photographs of 300-640 px.
DEMO_IMAGE_NAMES = ("astronaut", "chelsea", "coffee", "rocket")


def demo_images() -> list[LoadedImage]:
    """Load the demo photographs from ``skimage.data``.

    Returns:
        One :class:`LoadedImage` per name in :data:`DEMO_IMAGE_NAMES`, in that order, as RGB PIL images with
        ``path=None``.

    Raises:
        UAEError: scikit-image is not installed or its bundled data files are missing.
    """
    try:  # imported lazily: scikit-image is heavy and only the demo needs it
        import skimage.data
    except ImportError as exc:
        raise UAEError(
            f"the demo images need scikit-image, which cannot be imported ({exc}); "
            "install it with: pip install scikit-image"
        ) from None
    images = []
    for name in DEMO_IMAGE_NAMES:
        try:
            array = getattr(skimage.data, name)()
        except Exception as exc:  # a stripped install, or a version that would try to download the file
            raise UAEError(
                f"demo image {name!r} is not available from scikit-image ({type(exc).__name__}: {exc}); "
                "reinstall scikit-image or pass your own images"
            ) from None
        images.append(LoadedImage(name=name, path=None, image=load_image(Image.fromarray(array), name=name)))
    return images
