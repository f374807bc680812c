"""Real demo photographs bundled with scikit-image, so a first run needs neither internet nor user files."""

from __future__ import annotations

from PIL import Image

from uae_fast.data.images import LoadedImage, load_image
from uae_fast.errors import UAEError

__all__ = ["DEMO_CAPTIONS", "DEMO_IMAGE_NAMES", "demo_images"]

# All four ship inside the scikit-image wheel (no pooch download) and are 8-bit RGB photographs of 300-640 px.
DEMO_IMAGE_NAMES = ("astronaut", "chelsea", "coffee", "rocket")

# Hand-written long captions (LongCap style, 40-80 words) of the demo photographs: stage 1 trains on these pairs.
DEMO_CAPTIONS = {
    "astronaut": (
        "A formal studio portrait of a smiling woman astronaut with short light brown hair, wearing a bright orange "
        "pressurized launch and entry suit with a metal neck ring, a round mission patch and a name tag on the chest. "
        "She holds a black helmet with a glossy visor at the lower right. Behind her hang an American flag on the left "
        "and a white space shuttle model with an orange external tank on the right, against a mottled grey backdrop."
    ),
    "chelsea": (
        "A close-up of a tabby cat's face filling the frame, turned slightly to the left. The cat has large "
        "yellow-green eyes with dark round pupils, a pink nose, long white whiskers and short fur striped in brown, "
        "tan and black, with dark vertical stripes on the forehead and pale cream fur around the muzzle. The "
        "background is a soft, out-of-focus blur of white and beige shapes in an indoor room."
    ),
    "coffee": (
        "Seen from above at an angle, a small glossy dark red espresso cup with a white inside sits on a matching "
        "red saucer on a worn wooden table with warm brown grain. The cup holds an espresso topped with a smooth "
        "caramel-coloured crema, and a shiny silver teaspoon rests on the saucer beside the round handle, "
        "reflecting the light. The lighting is warm and the background falls off into darkness at the upper left."
    ),
    "rocket": (
        "A tall white rocket stands upright on its launch pad at dusk, under a deep blue evening sky that fades to "
        "lighter blue near the horizon. Four tall steel lattice lightning towers surround the pad, two near the "
        "rocket and two at the edges of the frame. Bright pad floodlights along the bottom shine with star-shaped "
        "glare, lighting the base of the rocket and the low dark clouds on the horizon."
    ),
}


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
