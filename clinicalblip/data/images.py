"""One image loader for training, generation and `data check`."""

from __future__ import annotations

from PIL import Image

from clinicalblip.errors import UserError


class ImageLoadError(UserError):
    """An image that is missing or cannot be decoded; the message names the file and the problem."""


def load_image(path: str) -> Image.Image:
    """Load a radiograph as an RGB PIL image (grayscale replicated to three channels)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise ImageLoadError(f"image not found: {path}") from None
    except Exception as exc:  # PIL raises many types for corrupt files
        raise ImageLoadError(f"cannot decode image {path}: {exc}") from None
