"""Image operations of the prepare stage (paper section 2).

A raw file becomes a 256x256 RGB JPEG: decode (format found from the content, not the
extension), convert any mode to RGB, rescale so the shorter side is 256 with an
antialiased filter, crop the central 256x256 patch, encode. Whatever goes wrong with one
file (any exception type, a codec this PIL lacks, a decompression bomb, running out of
memory) raises `BadImage` with a one-line reason; nothing here prints or logs. Crashes
and hangs of the decoder itself are `alexnet.decoder`'s concern.

Three decisions are params (`prepare`), each defaulting to what the original pipeline
did: the EXIF orientation is not applied, an embedded ICC profile is dropped with the
values kept as stored, and an animated or multi-page file gives its first frame.
"""

from __future__ import annotations

import importlib
import io
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from alexnet.errors import one_line
from alexnet.params import DEFAULTS, Frames, Resample
from alexnet.pilcodecs import missing_codec_hint

RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class BadImage(ValueError):
    """A file that cannot be turned into a training image; `str()` is the reason."""


# JPEG, and the Multi-Picture format of cameras and phones: a JPEG whose primary image
# comes first, followed by others (a second view, a depth or gain map), not frames.
JPEG_FORMATS = ("JPEG", "MPO")


@contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """PIL's own decompression-bomb check at `max_pixels` (it raises at twice its limit),
    so that `open_image`'s check at exactly `max_pixels` is the one that applies, however
    high it is set. PIL's limit is a global: restored after."""
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


@dataclass(frozen=True)
class Prepared:
    jpeg: bytes  # the 256x256 RGB JPEG
    converted: str | None  # what was converted ("CMYK", "PNG as JPEG", ...), None if plain


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Identify the image from its content and check its declared size (no decode yet)."""
    if not data:
        raise BadImage("empty file")
    # PIL says why it could not identify a file it would need a missing codec for (WebP,
    # AVIF) only in a warning, before raising; keep that reason.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            if _hevc_heif(data):
                raise BadImage(HEIF_REASON) from None
            missing = [str(w.message) for w in caught if "not installed" in str(w.message)]
            if not missing:
                raise BadImage("not an image") from None
            # "... because WEBP support not installed"
            feature = missing[0].rsplit(" support", 1)[0].rsplit(" ", 1)[-1].lower()
            raise BadImage(_missing_codec(missing[0], feature)) from None
        except Image.DecompressionBombError:
            raise BadImage("decompression bomb") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadImage(f"decompression bomb: {width}x{height} pixels > max_pixels {max_pixels}")
    if width < 1 or height < 1:
        raise BadImage(f"degenerate size {width}x{height}")
    _scale_grey_transparency(image)
    return image


# A phone's HEIC photo (often renamed .jpg): an ISO-BMFF file whose `ftyp` box names an
# HEVC-coded HEIF brand. PIL has no decoder for it; AVIF (the same container, AV1-coded,
# brands avif/avis) it has, where built with libavif.
HEVC_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis"}
AVIF_BRANDS = {b"avif", b"avis"}
HEIF_REASON = (
    "HEIC/HEIF photo (HEVC): PIL has no decoder for it; pip install pillow-heif and "
    "add pillow_heif.HeifImagePlugin to prepare.plugins (alexnet predict: --plugin it)"
)


def _hevc_heif(data: bytes) -> bool:
    """Whether `data` starts with the `ftyp` box of an HEVC-coded HEIF file: its major
    brand and compatible brands (4 bytes each, after a 4-byte minor version)."""
    size = int.from_bytes(data[:4], "big")
    if data[4:8] != b"ftyp" or not 16 <= size <= min(len(data), 4096):
        return False
    brands = {data[8:12]} | {data[i : i + 4] for i in range(16, size - 3, 4)}
    return bool(brands & HEVC_BRANDS) and not brands & AVIF_BRANDS


# PIL scales a 2- or 4-bit grey PNG's pixels to 0..255 (by these factors) but leaves its
# transparent value (tRNS) as stored: scaled here, or no pixel would match it.
LOW_BIT_GREY = {"L;2": 85, "L;4": 17}


def _scale_grey_transparency(image: Image.Image) -> None:
    if image.format != "PNG" or image.mode != "L" or "transparency" not in image.info:
        return
    factor = LOW_BIT_GREY.get(image.tile[0][3] if image.tile else None)
    if factor:
        value = image.info["transparency"] * factor
        if value <= 255:
            image.info["transparency"] = value
        else:  # beyond the bit depth: no pixel has it
            del image.info["transparency"]


def draft_for(image: Image.Image, size: int) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale (DCT domain) when the result still has
    its shorter side >= `size`; it only reduces when the shorter side is >= 2 * size."""
    if image.format not in JPEG_FORMATS:
        return
    width, height = image.size
    scale = size / min(width, height)
    image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))


# How far past a usual range (0..1, 0..255) a float image's values may go and still be of
# it: ringing of a sharpening filter or a Lanczos resample stays well inside.
FLOAT_OVERSHOOT = 1.5


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    # Pillow's convert clips 16/32-bit values to 0..255 (a white image); scale them instead,
    # from the full scale of the format where it is known: 16 bits (a 16-bit PNM is
    # scaled by PIL from its maxval to 0..65535); else the smallest usual scale that holds
    # the values (float 0..1, 8 or 16 bits), else the values' own maximum (32-bit data),
    # so that a dark image stays dark and none is clipped.
    values = np.asarray(image)
    sixteen = image.mode.startswith("I;16") or image.format == "PPM"
    scales = (65535.0,) if sixteen else (1.0, 255.0, 65535.0)[image.mode != "F" :]
    peak = float(values.max())  # NaN or inf where a float image has such a pixel
    if not math.isfinite(peak):
        values, peak = _without_nan(values)
    # float data overshoots its range a little after resampling or filtering: clipped
    over = FLOAT_OVERSHOOT if image.mode == "F" else 1.0
    top = next((scale for scale in scales if peak <= scale * over), peak)
    # (an infinite pixel is clipped to the range's end: +inf white, -inf black)
    scaled = np.clip(values.astype(np.float64) * (255.0 / top) + 0.5, 0, 255)
    return Image.fromarray(scaled.astype(np.uint8), "L")


def _without_nan(values: np.ndarray) -> tuple[np.ndarray, float]:
    """A float image's values with NaN (no value) as 0, and its largest finite value: one
    NaN or inf pixel would otherwise be the peak, and the whole image black. `BadImage`
    when no value is finite."""
    finite = np.isfinite(values)
    if not finite.any():
        raise BadImage("no finite pixel value (every pixel NaN or infinite)")
    return np.where(np.isnan(values), 0.0, values), float(values[finite].max())


def _transparent(image: Image.Image) -> bool:
    """Whether some pixels are marked transparent without an alpha channel (a PNG's single
    transparent colour or palette entries, `transparency` in modes RGB, L, 1 and P), or by
    an alpha channel that `to_srgb` would not take to LittleCMS (PA)."""
    marked = image.mode in ("RGB", "L", "1", "P") and "transparency" in image.info
    return marked or image.mode == "PA"


ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _on_white(image: Image.Image) -> Image.Image:
    """An image with transparency (an alpha channel, `ALPHA_MODES`, or `_transparent`)
    composited onto white, as L where it is grey and RGB otherwise: its colour space
    stays the one its ICC profile describes (a grey profile takes only L)."""
    base = "L" if image.mode in ("1", "L", "LA", "La") else "RGB"
    with_alpha = image.convert(f"{base}A")
    white = Image.new(base, image.size, 255 if base == "L" else (255, 255, 255))
    white.paste(with_alpha.convert(base), mask=with_alpha.getchannel("A"))
    return white


def _grey(mode: str) -> bool:
    return mode in ("L", "LA", "La", "F") or mode.startswith("I")


def _to_l(image: Image.Image) -> Image.Image:
    """A grey image (`_grey` modes) as L, its transparent pixels white: an alpha
    channel's, and those of its `transparency` value (PIL honours it for L only)."""
    if image.mode in ("LA", "La") or image.mode == "L" and "transparency" in image.info:
        return _on_white(image)
    if image.mode == "L":
        return image
    grey = _high_bit_depth_to_l(image)
    if "transparency" in image.info:
        hole = np.asarray(image) == image.info["transparency"]
        grey.paste(255, mask=Image.fromarray(hole.astype(np.uint8) * 255, "L"))
    return grey


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB. Transparent pixels are composited onto white, since their
    stored colour is arbitrary: an alpha channel's, and those of `_transparent` images."""
    mode = image.mode
    if _transparent(image) or mode in ALPHA_MODES:
        return _on_white(image).convert("RGB")
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return _to_l(image).convert("RGB")
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


def resize_crop(
    image: Image.Image, size: int, resample: Resample = DEFAULTS.prepare.resample
) -> Image.Image:
    """Shorter side to `size`, central `size` x `size` crop, in one antialiased resample of
    only the cropped region (the same sampling as resizing all, then cropping)."""
    box = centre_box(*image.size, size)
    return image.resize((size, size), RESAMPLE[resample], box=box)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def conversion_of(image: Image.Image, extension: str) -> list[str]:
    """What prepare changes besides geometry, for the report; empty for a plain RGB JPEG."""
    notes = []
    if image.format not in JPEG_FORMATS and extension.lower() in (".jpg", ".jpeg"):
        notes.append(f"{image.format} as JPEG")
    elif image.format not in JPEG_FORMATS:
        notes.append(str(image.format))
    if image.mode != "RGB":
        notes.append(image.mode)
    elif "transparency" in image.info:
        notes.append("RGB with a transparent colour")
    return notes


def first_frame(image: Image.Image, frames: Frames) -> str | None:
    """The note for an animated or multi-page file (whose first frame is what PIL has
    open), or `BadImage` when such files are to be skipped. A JPEG is one photo, a
    Multi-Picture one too: its primary image, which PIL has open."""
    if image.format in JPEG_FORMATS:
        return None
    try:
        count = getattr(image, "n_frames", 1)
    except Exception:  # a later frame is damaged; the first may still be whole
        image.seek(0)
        count = "several"
    if count == 1:
        return None
    if frames == "skip":
        raise BadImage(f"{count} frames (params prepare.frames: skip)")
    return f"first of {count} frames"


# The EXIF Orientation tag, and its values that turn an image (1 is upright already).
EXIF_ORIENTATION = 0x0112
TURNS = range(2, 9)
# How much of an unusable orientation value the note shows (a string tag can be long).
SHOWN_VALUE = 40


def orient(image: Image.Image) -> tuple[Image.Image, str | None]:
    """The image turned upright by its EXIF orientation tag (2-8), and a note; one whose
    tag is no such integer is kept as stored, noted."""
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    if orientation in (1, None):
        return image, None
    # PIL's exif_transpose looks the value up among 2..8 (6.0 and a rational 6/1 find
    # 6): an ASCII "6" or a rational 6.5 would be reported as applied with nothing
    # turned, and int("x") would skip a readable photo
    if isinstance(orientation, str | bytes) or orientation not in TURNS:
        shown = repr(orientation)[:SHOWN_VALUE]  # repr: escaped, so one line
        return image, f"EXIF orientation unusable, ignored ({shown})"
    return ImageOps.exif_transpose(image), f"EXIF orientation {orientation} applied"


def to_srgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """RGB converted from the embedded ICC profile to sRGB (LittleCMS), and a note; an
    image without a usable profile is converted as if it had none."""
    profile = image.info.get("icc_profile")
    if not profile:
        return to_rgb(image), None
    from PIL import ImageCms  # ImportError without LittleCMS: the file's reason says so

    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        # transparent pixels made white first, as without a profile, in a mode of the
        # profile's colour space: a grey one takes L only (not LA, nor 16 bits)
        if source.profile.xcolor_space == "GRAY" and _grey(image.mode):
            image = _to_l(image)
        elif image.mode in ("RGB", "L") and "transparency" in image.info:
            image = _on_white(image)
        elif image.mode not in ("RGB", "CMYK", "L", "LAB") or _transparent(image):
            image = to_rgb(image)
        srgb = ImageCms.createProfile("sRGB")
        converted = ImageCms.profileToProfile(image, source, srgb, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError) as error:  # OSError: a profile LittleCMS can't read
        return to_rgb(image), f"ICC profile unusable, ignored ({one_line(error)})"
    return converted, "ICC profile to sRGB"


def load_plugins(names: Sequence[str]) -> None:
    """Import the modules that register more formats with PIL (params prepare.plugins)."""
    for name in names:
        importlib.import_module(name)


# PIL's decoder names where they differ from its feature names (alexnet.pilcodecs.CODECS).
_FEATURE_OF_DECODER = {"jpeg": "jpg", "zip": "zlib", "jpeg2k": "jpg_2000"}


def _missing_codec(message: str, feature: str) -> str:
    """The reason for a file that needs a codec this PIL lacks: PIL's words, then which
    codec and the package that provides it."""
    return f"needs a codec this PIL lacks ({message}): {missing_codec_hint(feature)}"


def reason_for(error: Exception) -> str:
    """The one-line reason a file is skipped for an unexpected exception."""
    message = one_line(error, first_only=True)  # a decoder's later lines are detail
    if isinstance(error, MemoryError):
        return "out of memory while decoding"
    if isinstance(error, ImportError) and "imagingcms" in message.lower():
        return _missing_codec("LittleCMS colour management", "littlecms2")
    if isinstance(error, OSError) and message.endswith("not available"):
        decoder = message.split()[1]  # "decoder libtiff not available"
        return _missing_codec(message, _FEATURE_OF_DECODER.get(decoder, decoder))
    if isinstance(error, Image.DecompressionBombError):
        return "decompression bomb"
    if isinstance(error, OSError | SyntaxError | ValueError | EOFError):
        return f"corrupt: {message}"  # how PIL reports truncated and damaged data
    return f"cannot decode: {type(error).__name__}: {message}"


def prepare_image(
    data: bytes,
    extension: str = ".jpeg",
    size: int = DEFAULTS.prepare.size,
    quality: int = DEFAULTS.prepare.quality,
    resample: Resample = DEFAULTS.prepare.resample,
    max_pixels: int = DEFAULTS.prepare.max_pixels,
    exif_orientation: bool = DEFAULTS.prepare.exif_orientation,
    icc_to_srgb: bool = DEFAULTS.prepare.icc_to_srgb,
    frames: Frames = DEFAULTS.prepare.frames,
    plugins: Sequence[str] = DEFAULTS.prepare.plugins,
) -> Prepared:
    """Encoded file -> `Prepared` size x size RGB JPEG, or `BadImage` whatever went wrong.
    The keywords are params `prepare`'s image options (`PrepareParams.IMAGE_KEYS`)."""
    load_plugins(plugins)
    try:
        with pixel_limit(max_pixels):
            image = open_image(data, max_pixels)
            notes = conversion_of(image, extension)
            notes.append(first_frame(image, frames))
            draft_for(image, size)
            image.load()
            if exif_orientation:
                image, note = orient(image)
                notes.append(note)
            if icc_to_srgb:
                rgb, note = to_srgb(image)
                notes.append(note)
            else:
                rgb = to_rgb(image)
            out = resize_crop(rgb, size, resample)
            jpeg = encode_jpeg(out, quality)
    except BadImage:
        raise
    except Exception as error:  # one file's failure, of whatever kind, is that file's
        raise BadImage(reason_for(error)) from None
    return Prepared(jpeg, ", ".join(note for note in notes if note) or None)
