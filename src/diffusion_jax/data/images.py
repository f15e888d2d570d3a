"""Image conversions shared by the sources, all with PIL and all explicit.

Channels: `num_channels=3` gives RGB, `num_channels=1` gives grayscale 'L' (PIL's ITU-R 601-2
luma, L = 0.299 R + 0.587 G + 0.114 B). Transparent images (RGBA, LA, palette with a
transparent colour) are composited over a white background first; 16-bit grayscale is scaled
to 8 bits (PIL's own conversion would clip it); palette and CMYK images are expanded by PIL.

Geometry: crop the largest centred square, convert channels, then resize to image_size x
image_size with the filter the caller names (PIL's filters are antialiased when downsampling).
"""

import numpy as np
from PIL import Image

NUM_CHANNELS = (1, 3)
_MODE_FOR_CHANNELS = {1: "L", 3: "RGB"}
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _has_transparency(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info


def convert_channels(img: Image.Image, num_channels: int) -> Image.Image:
    """PIL image of any common mode -> mode 'L' (num_channels=1) or 'RGB' (num_channels=3)."""
    target = _MODE_FOR_CHANNELS[num_channels]
    if img.mode in _SIXTEEN_BIT_MODES:
        wide = np.clip(np.asarray(img, dtype=np.float64), 0, 65535)
        img = Image.fromarray(np.round(wide * (255.0 / 65535.0)).astype(np.uint8))
    if _has_transparency(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == target else img.convert(target)


def fit(img: Image.Image, size: int, num_channels: int, resample: int) -> np.ndarray:
    """Any PIL image -> uint8 (size, size, num_channels): centre square crop, channels, resize."""
    width, height = img.size
    side = min(width, height)
    if width != height:
        left, top = (width - side) // 2, (height - side) // 2
        img = img.crop((left, top, left + side, top + side))
    img = convert_channels(img, num_channels)
    if side != size:
        img = img.resize((size, size), resample=resample)
    return to_hwc(img)


def to_hwc(img: Image.Image) -> np.ndarray:
    """PIL 'L' or 'RGB' image -> uint8 (H, W, C)."""
    array = np.asarray(img, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def prepare_array(image: np.ndarray, size: int, num_channels: int, resample: int) -> np.ndarray:
    """uint8 (H, W) or (H, W, C) with C in 1, 3, 4 -> uint8 (size, size, num_channels).

    Arrays already of the requested shape are returned unchanged (no resampling round trip).
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape == (size, size, num_channels):
        return image
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return fit(Image.fromarray(image), size, num_channels, resample)
