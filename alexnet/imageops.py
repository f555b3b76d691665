"""Image operations of the prepare stage (paper section 2).

A raw file becomes a 256x256 RGB JPEG: decode (format found from the content, not the
extension), convert any mode to RGB, rescale so the shorter side is 256 with an
antialiased filter, crop the central 256x256 patch, encode. Files that cannot become
such an image raise `BadImage` with a short reason; nothing here prints or logs.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from alexnet.params import DEFAULTS, Resample

RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class BadImage(ValueError):
    """A file that cannot be turned into a training image; `str()` is the reason."""


@dataclass(frozen=True)
class Prepared:
    jpeg: bytes  # the 256x256 RGB JPEG
    converted: str | None  # what was converted ("CMYK", "PNG as JPEG", ...), None if plain


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Identify the image from its content and check its declared size (no decode yet)."""
    if not data:
        raise BadImage("empty file")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage("not an image") from None
    except Image.DecompressionBombError:
        raise BadImage("decompression bomb") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadImage(f"decompression bomb: {width}x{height} pixels > max_pixels {max_pixels}")
    if width < 1 or height < 1:
        raise BadImage(f"degenerate size {width}x{height}")
    return image


def draft_for(image: Image.Image, size: int) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale (DCT domain) when the result still has
    its shorter side >= `size`; it only reduces when the shorter side is >= 2 * size."""
    if image.format != "JPEG":
        return
    width, height = image.size
    scale = size / min(width, height)
    image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    # Pillow's convert clips 16/32-bit values to 0..255 (a white image); scale them instead.
    values = np.asarray(image)
    top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
    if image.mode == "F":
        top = max(float(values.max()), 1.0)
    scaled = np.clip(values.astype(np.float64) * (255.0 / top) + 0.5, 0, 255)
    return Image.fromarray(scaled.astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB. Transparent pixels are composited onto white, since their
    stored colour is arbitrary."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_l(image).convert("RGB")
    if mode == "P" and "transparency" in image.info or mode == "PA":
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise BadImage(f"cannot convert mode {mode} to RGB: {error}") from None


def centre_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The source region that becomes the central size x size patch once the shorter side
    is rescaled to `size`: a square of the shorter side, centred."""
    side = min(width, height)
    left = (width - side) / 2
    top = (height - side) / 2
    return (left, top, left + side, top + side)


def resize_crop(image: Image.Image, size: int, resample: str = "bilinear") -> Image.Image:
    """Shorter side to `size`, central `size` x `size` crop, in one antialiased resample of
    only the cropped region (the same sampling as resizing all, then cropping)."""
    box = centre_box(*image.size, size)
    return image.resize((size, size), RESAMPLE[resample], box=box)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def conversion_of(image: Image.Image, extension: str) -> str | None:
    """What prepare changes besides geometry, for the report; None for a plain RGB JPEG."""
    notes = []
    if image.format != "JPEG" and extension.lower() in (".jpg", ".jpeg"):
        notes.append(f"{image.format} as JPEG")
    elif image.format != "JPEG":
        notes.append(str(image.format))
    if image.mode != "RGB":
        notes.append(image.mode)
    return ", ".join(notes) or None


def prepare_image(
    data: bytes,
    extension: str = ".jpeg",
    size: int = DEFAULTS.prepare.size,
    quality: int = DEFAULTS.prepare.quality,
    resample: Resample = DEFAULTS.prepare.resample,
    max_pixels: int = DEFAULTS.prepare.max_pixels,
) -> Prepared:
    """Encoded file -> `Prepared` size x size RGB JPEG, or `BadImage`. The keywords are
    params `prepare`'s image options (`PrepareParams.IMAGE_KEYS`)."""
    image = open_image(data, max_pixels)
    converted = conversion_of(image, extension)
    try:
        draft_for(image, size)
        image.load()
        out = resize_crop(to_rgb(image), size, resample)
    except BadImage:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # Pillow reports truncated and corrupt data as OSError / SyntaxError.
        raise BadImage(f"corrupt: {error}") from None
    return Prepared(encode_jpeg(out, quality), converted)
