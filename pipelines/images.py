"""The I2V input image: opened as RGB and centre-cropped to the request's aspect."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL.Image import Image


def load_image(path: str | None, width: int, height: int) -> Image:
    """Open an RGB image and centre-crop it to the target aspect (the pipeline then resizes)."""
    from PIL import Image

    if path is None:
        raise ValueError("image-to-video needs an image")
    with Image.open(path) as src:
        img = src.convert("RGB")
    return crop_to_aspect(img, width / height)


def crop_to_aspect(img: Image, target: float) -> Image:
    """The largest centred crop of `img` with width/height == `target` (`img` if already there)."""
    w, h = img.size
    if abs(w / h - target) <= 1e-3:
        return img
    if w / h > target:  # too wide: crop the sides
        new_w = round(h * target)
        left = (w - new_w) // 2
        return img.crop((left, 0, left + new_w, h))
    new_h = round(w / target)  # too tall: crop top and bottom
    top = (h - new_h) // 2
    return img.crop((0, top, w, top + new_h))
