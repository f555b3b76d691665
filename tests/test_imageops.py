"""The prepare stage's per-image operation: geometry, modes, and every oddity."""

from __future__ import annotations

import io
import re
import struct
import sys
import types
import zlib

import numpy as np
import pytest
from PIL import Image

from alexnet.doctor import is_pillow_simd
from alexnet.imageops import (
    BadImage,
    centre_box,
    draft_for,
    open_image,
    prepare_image,
    resize_crop,
    to_rgb,
)
from alexnet.params import DEFAULTS
from alexnet.pilcodecs import missing_codec_hint
from tests.helpers import encode, jpeg, photo

DEFAULT_MAX_PIXELS = DEFAULTS.prepare.max_pixels


def decoded(prepared) -> np.ndarray:
    image = Image.open(io.BytesIO(prepared.jpeg))
    assert image.format == "JPEG" and image.mode == "RGB"
    return np.asarray(image, dtype=np.float64)


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (256, 256), (200, 180), (1200, 300)])
def test_output_is_exactly_256_square(size):
    out = decoded(prepare_image(jpeg(*size)))
    assert out.shape == (256, 256, 3)


def test_shorter_side_is_rescaled_then_centre_cropped():
    # 600x300: the shorter side (300) becomes 256, the long side 512, and the central
    # 256 columns are kept, i.e. source columns 150..450. Bands outside must vanish.
    pixels = np.zeros((300, 600, 3), np.uint8)
    pixels[:, :140] = (255, 0, 0)
    pixels[:, 460:] = (0, 0, 255)
    pixels[:, 140:460] = (0, 200, 0)
    out = decoded(prepare_image(encode(Image.fromarray(pixels), "PNG"), ".png", quality=95))
    assert out[:, :, 0].max() < 40 and out[:, :, 2].max() < 40  # no red or blue band left
    assert out[:, :, 1].mean() > 190


def stripes(width: int, height: int) -> Image.Image:
    """High frequencies in both directions: red columns of period 3, green rows of
    period 3, a blue checkerboard of period 2. Resampled, they alias into patterns that
    a one-pixel shift or another filter changes everywhere."""
    y, x = np.mgrid[0:height, 0:width]
    red = np.where(x % 3 == 0, 255, 0)
    green = np.where(y % 3 == 1, 255, 0)
    blue = np.where((x + y) % 2 == 0, 230, 20)
    return Image.fromarray(np.stack([red, green, blue], -1).astype(np.uint8), "RGB")


def resize_then_crop(image: Image.Image, resample: str, dx: int = 0, dy: int = 0) -> np.ndarray:
    """The independent expectation: resize the WHOLE image so its shorter side is 256
    (sizes chosen so that both sides scale exactly), then crop the central 256 x 256
    window of the result (moved by dx, dy to show what a shift would look like)."""
    width, height = image.size
    side = min(width, height)
    assert width * 256 % side == 0 and height * 256 % side == 0
    full_w, full_h = width * 256 // side, height * 256 // side
    full = image.resize((full_w, full_h), FILTERS[resample])
    left, top = (full_w - 256) // 2 + dx, (full_h - 256) // 2 + dy
    assert (full_w - 256) % 2 == 0 and (full_h - 256) % 2 == 0
    return np.asarray(full.crop((left, top, left + 256, top + 256)), dtype=np.int64)


# (width, height): landscape and portrait, a centre window at a half-pixel source offset
# (325 x 320: box left 2.5), and an upscale
GEOMETRIES = [(600, 300), (375, 750), (325, 320), (200, 100)]
OTHER = {"bilinear": "bicubic", "bicubic": "bilinear", "lanczos": "bilinear"}
FILTERS = {  # Pillow's own, not the module's table
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


# How far a resize of the central box may be from resizing all, then cropping (levels).
# Pillow's upscale of a box rounds a few values by up to 2. A downscale agrees exactly
# under pillow-simd (the project's PIL); stock Pillow, the fallback where pillow-simd
# cannot build, rounds its box resize's intermediate differently: 1 level off in about
# 1% of pixels (375x750, bilinear and bicubic). A shifted window or another filter is
# off by far more in either.
UPSCALE_TOLERANCE = 2
STOCK_PILLOW_DOWNSCALE_TOLERANCE = 1


def resize_tolerance(width: int, height: int) -> int:
    if min(width, height) < 256:
        return UPSCALE_TOLERANCE
    return 0 if is_pillow_simd() else STOCK_PILLOW_DOWNSCALE_TOLERANCE


@pytest.mark.parametrize("resample", ["bilinear", "bicubic", "lanczos"])
@pytest.mark.parametrize(("width", "height"), GEOMETRIES)
def test_prepared_pixels_are_resize_then_centre_crop_before_encoding(
    width, height, resample, monkeypatch
):
    # The image prepare_image encodes (captured before JPEG), against the whole image
    # resized with the same filter and cropped at the centre: the same pixels, within
    # `resize_tolerance`.
    from alexnet import imageops

    captured = []
    monkeypatch.setattr(imageops, "encode_jpeg", lambda image, q: captured.append(image) or b"")
    source = stripes(width, height)
    prepare_image(encode(source, "PNG"), ".png", resample=resample)
    (image,) = captured
    assert image.size == (256, 256) and image.mode == "RGB"
    ours = np.asarray(image, dtype=np.int64)
    assert np.array_equal(ours, np.asarray(resize_crop(source, 256, resample)))
    tolerance = resize_tolerance(width, height)

    def matches(expected: np.ndarray) -> bool:
        return np.abs(ours - expected).max() <= tolerance

    assert matches(resize_then_crop(source, resample))
    # What the comparison rules out: a window one pixel off, another filter.
    dx, dy = (1, 0) if width > height else (0, 1)
    assert not matches(resize_then_crop(source, resample, dx, dy))
    assert not matches(resize_then_crop(source, resample, -dx, -dy))
    assert not matches(resize_then_crop(source, OTHER[resample]))


def test_centre_box_is_the_central_square_of_the_shorter_side():
    assert centre_box(600, 300, 256) == (150.0, 0.0, 450.0, 300.0)
    assert centre_box(300, 601, 256) == (0.0, 150.5, 300.0, 450.5)


def test_draft_decodes_large_jpegs_at_reduced_scale():
    image = Image.open(io.BytesIO(jpeg(1100, 800)))
    draft_for(image, 256)
    assert image.size == (550, 400)  # 1/2 scale: still >= 256 on the shorter side
    small = Image.open(io.BytesIO(jpeg(500, 375)))
    draft_for(small, 256)
    assert small.size == (500, 375)  # shorter side < 512: no reduction possible


def test_draft_result_close_to_full_decode():
    data = jpeg(2000, 1500, seed=7)
    with_draft = decoded(prepare_image(data, quality=100))
    image = Image.open(io.BytesIO(data)).convert("RGB")
    full = image.resize((256, 256), Image.Resampling.BILINEAR, box=centre_box(2000, 1500, 256))
    assert np.abs(with_draft - np.asarray(full, dtype=np.float64)).mean() < 3.0


@pytest.mark.parametrize(
    ("mode", "fmt", "extension", "note"),
    [
        ("CMYK", "JPEG", ".JPEG", "CMYK"),
        ("L", "JPEG", ".JPEG", "L"),
        ("RGB", "PNG", ".JPEG", "PNG as JPEG"),
        ("LA", "PNG", ".png", "PNG, LA"),
        ("P", "PNG", ".png", "PNG, P"),
        ("RGBA", "PNG", ".png", "PNG, RGBA"),
        ("I;16", "PNG", ".png", "PNG, I;16"),
    ],
)
def test_every_mode_becomes_rgb_and_is_reported(mode, fmt, extension, note):
    source = photo(320, 240, seed=1)
    if mode == "I;16":
        grey = np.asarray(source.convert("L"), dtype=np.uint16) * 257
        image = Image.fromarray(grey)
    else:
        image = source.convert(mode)
    prepared = prepare_image(encode(image, fmt), extension)
    out = decoded(prepared)
    assert prepared.converted == note
    assert out.shape == (256, 256, 3)
    # Content survives the conversion: not blank, and correlated with the source.
    reference = np.asarray(source.convert("L").resize((256, 256), box=centre_box(320, 240, 256)))
    correlation = np.corrcoef(out.mean(-1).ravel(), reference.ravel())[0, 1]
    assert correlation > 0.8, (mode, correlation)


def test_sixteen_bit_is_scaled_not_clipped():
    ramp = (np.linspace(0, 65535, 300)[None, :] * np.ones((300, 1))).astype(np.uint16)
    prepared = prepare_image(encode(Image.fromarray(ramp), "PNG"), ".png")
    out = decoded(prepared)
    assert 90 < out.mean() < 165  # a clipped conversion would be almost all white


@pytest.mark.parametrize(
    ("mode", "values", "mean"),
    [
        ("I", np.linspace(0, 1_000_000, 300), 127.5),  # 32-bit data: its own maximum
        ("I", np.full(300, 20_000), 78),  # within 16 bits: of 65535, not stretched
        ("F", np.linspace(0.0, 1.0, 300), 127.5),  # float 0..1
        ("F", np.full(300, 95.0), 95),  # float 0..255: a flat grey stays that grey
        ("F", np.linspace(0.0, 1.02, 300), 128.8),  # 0..1 overshot a little: clipped, not black
        ("F", np.linspace(0.0, 256.0, 300), 127.9),  # 0..255 overshot a little
    ],
)
def test_wide_and_float_values_are_scaled_to_their_range_not_clipped(mode, values, mean):
    array = (values[None, :] * np.ones((300, 1))).astype(np.int32 if mode == "I" else np.float32)
    prepared = prepare_image(encode(Image.fromarray(array, mode), "TIFF"), ".tif")
    assert prepared.converted == f"TIFF, {mode}"
    assert abs(decoded(prepared).mean() - mean) <= 2


def test_a_dark_sixteen_bit_pgm_stays_dark():
    # PIL reads a 16-bit PGM as mode I, scaled to 0..65535: values of 200 are near black,
    # not the mid-grey an 8-bit range would make of them (nor brighter than 300s).
    header = b"P5\n300 300\n65535\n"
    for level, expected in ((200, 1), (300, 1), (65535, 255)):
        data = header + np.full(300 * 300, level, dtype=">u2").tobytes()
        prepared = prepare_image(data, ".pgm")
        assert prepared.converted == "PPM, I"
        assert abs(decoded(prepared).mean() - expected) <= 1, level


def _float_tiff(values: np.ndarray) -> bytes:
    return encode(Image.fromarray(values.astype(np.float32), "F"), "TIFF")


def test_nan_and_infinite_float_pixels_leave_the_others_as_a_clean_image_has_them():
    # One NaN or inf pixel was the peak: the whole image black, and kept. The finite
    # values keep their scale; NaN and -inf are black, +inf the top of the range.
    clean = np.linspace(0.0, 0.8, 64).reshape(8, 8)
    odd = clean.copy()
    odd[0, :3] = (np.nan, np.inf, -np.inf)
    grey = {}
    for name, values in (("clean", clean), ("odd", odd)):
        image = open_image(_float_tiff(values), DEFAULT_MAX_PIXELS)
        grey[name] = np.asarray(to_rgb(image))[..., 0].astype(np.int64)
    assert np.array_equal(grey["odd"][0, 3:], grey["clean"][0, 3:])
    assert np.array_equal(grey["odd"][1:], grey["clean"][1:])
    assert grey["clean"].max() == 204  # 0.8 of 0..1: not stretched to white
    assert list(grey["odd"][0, :3]) == [0, 255, 0]
    prepared = prepare_image(_float_tiff(np.kron(odd, np.ones((40, 40)))), ".tif")
    assert prepared.converted == "TIFF, F" and decoded(prepared).mean() > 60


def test_a_float_image_without_a_finite_value_is_skipped_with_its_reason():
    values = np.full((300, 300), np.nan)
    values[::2] = np.inf
    with pytest.raises(BadImage, match=r"^no finite pixel value \(every pixel NaN or infin"):
        prepare_image(_float_tiff(values), ".tif")


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (300, 300), (10, 20, 30, 0))
    out = decoded(prepare_image(encode(rgba, "PNG"), ".png"))
    assert out.min() > 245


def _grey_png(bits: int, rows: list[list[int]], transparent: int) -> bytes:
    """A grey PNG of `bits` per pixel with a tRNS value (PIL writes none below 8 bits)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    per_byte = 8 // bits
    raw = b""
    for row in rows:
        packed = bytearray()
        for start in range(0, len(row), per_byte):
            byte = 0
            for value in row[start : start + per_byte]:
                byte = byte << bits | value
            packed.append(byte)
        raw += b"\0" + bytes(packed)  # filter type 0
    header = struct.pack(">IIBBBBB", len(rows[0]), len(rows), bits, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"tRNS", struct.pack(">H", transparent))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(("bits", "transparent", "opaque"), [(1, 0, 1), (2, 1, 0), (4, 1, 0)])
def test_a_low_bit_grey_pngs_transparent_value_becomes_white(bits, transparent, opaque):
    # the top half transparent; the bottom half keeps its level (0 black, 1 of 1 bit white)
    rows = [[transparent] * 64] * 32 + [[opaque] * 64] * 32
    out = decoded(prepare_image(_grey_png(bits, rows, transparent), ".png"))
    assert out[:100].min() > 245
    assert abs(out[160:].mean() - opaque * 255 // ((1 << bits) - 1)) <= 2
    # a transparent value the bit depth cannot hold marks no pixel
    rows = [[1] * 64] * 64
    out = decoded(prepare_image(_grey_png(bits, rows, transparent=1 << bits), ".png"))
    assert abs(out.mean() - 255 // ((1 << bits) - 1)) <= 2


@pytest.mark.parametrize("mode", ["RGBA", "LA", "RGBa", "PA"])
def test_partly_transparent_pixels_are_composited_onto_white_by_the_formula(mode):
    # out = a c + (1 - a) 255 for alpha a in [0, 1], to the nearest level
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert(mode)
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
    alpha = rgba[..., 3:] / 255
    expected = rgba[..., :3] * alpha + 255 * (1 - alpha)
    assert np.abs(np.asarray(to_rgb(image), dtype=np.float64) - expected).max() <= 0.5 + 1e-9


@pytest.mark.parametrize(
    ("mode", "colour", "note"),
    [("RGB", (10, 20, 30), "PNG, RGB with a transparent colour"), ("L", 10, "PNG, L")],
)
def test_a_pngs_transparent_colour_becomes_white(mode, colour, note):
    # PNG's tRNS chunk: one colour of an RGB or grey image is transparent, no alpha.
    image = Image.new(mode, (300, 300), colour)
    image.paste(0 if mode == "L" else (0, 0, 0), (0, 0, 300, 150))  # opaque black top
    prepared = prepare_image(encode(image, "PNG", transparency=colour), ".png")
    out = decoded(prepared)
    assert prepared.converted == note
    assert out[:100].max() < 10 and out[160:].min() > 245
    # The same with a (linear) profile of its own colour space, converted to sRGB: white
    # too, not the stored colour, and the opaque pixels converted.
    from PIL import features

    profile = _linear_profile(b"GRAY" if mode == "L" else b"RGB ")
    tagged = encode(image, "PNG", transparency=colour, icc_profile=profile)
    if not features.check("littlecms2"):  # a PIL built without liblcms2-dev (CI has it)
        with pytest.raises(BadImage):
            prepare_image(tagged, ".png", icc_to_srgb=True)
        return
    converted = prepare_image(tagged, ".png", icc_to_srgb=True)
    assert converted.converted == f"{note}, ICC profile to sRGB"
    out = decoded(converted)
    assert out[:100].max() < 10 and out[160:].min() > 245


@pytest.mark.parametrize("mode", ["LA", "I;16"])
@pytest.mark.parametrize("icc_to_srgb", [False, True])
def test_grey_images_with_transparency_become_white_with_or_without_a_grey_profile(
    mode, icc_to_srgb
):
    # A grey ICC profile takes L only: LA and 16-bit grey went through RGB and the
    # profile was dropped as unusable; a 16-bit PNG's transparent value was not honoured.
    from PIL import features

    if mode == "LA":
        image = Image.new("LA", (300, 300), (10, 0))  # transparent
        image.paste((0, 255), (0, 0, 300, 150))  # opaque black top
        options = {}
    else:
        image = Image.new("I;16", (300, 300), 2570)  # ~10 of 255
        image.paste(0, (0, 0, 300, 150))
        options = {"transparency": 2570}
    data = encode(image, "PNG", icc_profile=_linear_profile(b"GRAY"), **options)
    if icc_to_srgb and not features.check("littlecms2"):  # no ImageCms in this PIL
        with pytest.raises(BadImage):
            prepare_image(data, ".png", icc_to_srgb=True)
        return
    prepared = prepare_image(data, ".png", icc_to_srgb=icc_to_srgb)
    out = decoded(prepared)
    assert out[:100].max() < 10 and out[160:].min() > 245
    if icc_to_srgb:
        assert prepared.converted.endswith(", ICC profile to sRGB"), prepared.converted


def test_plain_rgb_jpeg_is_not_reported_as_converted():
    assert prepare_image(jpeg(300, 300)).converted is None


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"<html><body>gone</body></html>", "not an image"),
        (jpeg(400, 300)[:3000], "corrupt"),
    ],
)
def test_bad_files_raise_bad_image_with_reason(data, reason):
    with pytest.raises(BadImage, match=reason):
        prepare_image(data)


def ftyp(major: bytes, *compatible: bytes) -> bytes:
    """The start of an ISO-BMFF file (HEIF, AVIF): its `ftyp` box, then other boxes."""
    body = major + bytes(4) + b"".join(compatible)
    return (8 + len(body)).to_bytes(4, "big") + b"ftyp" + body + bytes(200)


@pytest.mark.parametrize(
    "data",
    [ftyp(b"heic", b"mif1", b"heic"), ftyp(b"mif1", b"mif1", b"heic"), ftyp(b"heix")],
    ids=["iphone", "mif1", "heix"],
)
def test_a_heic_photo_says_which_plugin_reads_it(data):
    # A phone's HEIC renamed .jpg read "not an image", or (major brand mif1) asked for
    # libavif, which does not decode HEVC.
    with pytest.raises(BadImage, match=r"HEIC/HEIF photo .*pillow_heif.HeifImagePlugin"):
        prepare_image(data)


def test_an_avif_file_is_not_taken_for_heic():
    with pytest.raises(BadImage) as caught:
        prepare_image(ftyp(b"avif", b"mif1", b"avif", b"heic"))
    assert "HEIC" not in str(caught.value)


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size (a decompression bomb's signature)."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = data[12:29]
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(BadImage, match="decompression bomb"):
        prepare_image(_png_claiming(40_000, 40_000), ".png")
    with pytest.raises(BadImage, match="max_pixels 1000"):
        open_image(jpeg(100, 100), max_pixels=1000)


def test_max_pixels_above_pils_own_limit_is_the_limit():
    # PIL refuses more than twice its Image.MAX_IMAGE_PIXELS (~179M pixels) by itself:
    # a max_pixels set higher must let a 200M-pixel image through (to its decode: this
    # one's data ends after its header), and one above it be refused with its size.
    claims, before = _png_claiming(20_000, 10_000), Image.MAX_IMAGE_PIXELS
    with pytest.raises(BadImage, match="^decompression bomb: 20000x10000 pixels > max_pixels"):
        prepare_image(claims, ".png")
    with pytest.raises(BadImage, match="^corrupt"):
        prepare_image(claims, ".png", max_pixels=300_000_000)
    assert Image.MAX_IMAGE_PIXELS == before  # PIL's global, restored


# Issue 14: any failure of one file is that file's BadImage; the params' decisions.


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (MemoryError(), "out of memory while decoding"),
        (NotImplementedError("Unimplemented DXGI format 99"), "cannot decode: "),
        (RuntimeError("boom\nsecond line"), "cannot decode: RuntimeError: boom$"),
        (ImportError("The _imagingcms C module is not installed"), "needs a codec .*LittleCMS"),
        (OSError("decoder libtiff not available"), r"needs a codec .*\(decoder libtiff not"),
        (OSError("Unsupported BMP pixel depth (64)"), "corrupt: Unsupported BMP pixel depth"),
    ],
)
def test_any_exception_of_one_file_becomes_its_one_line_reason(monkeypatch, error, reason):
    from alexnet import imageops

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(imageops, "resize_crop", fail)
    with pytest.raises(BadImage, match=reason) as caught:
        prepare_image(jpeg(300, 200))
    assert "\n" not in str(caught.value)


def test_a_format_whose_codec_is_missing_names_it(monkeypatch):
    from PIL import WebPImagePlugin

    data = encode(photo(300, 260), "WEBP") if WebPImagePlugin.SUPPORTED else None
    monkeypatch.setattr(WebPImagePlugin, "SUPPORTED", False)
    data = data or b"RIFF\x24\x00\x00\x00WEBPVP8 " + bytes(40)
    with pytest.raises(BadImage, match=r"needs a codec this PIL lacks \(.*WEBP support not"):
        prepare_image(data, ".webp")


def _oriented(orientation: int) -> bytes:
    """A 300x200 JPEG, red on its left half, tagged with an EXIF orientation."""
    image = Image.new("RGB", (300, 200), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 150, 200))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", exif=exif.tobytes())


def test_exif_orientation_is_kept_by_default_and_applied_when_set():
    data = _oriented(6)  # "rotate 90 CW to view": the red left half ends up on top
    plain = decoded(prepare_image(data))
    assert plain[128, 20, 0] > 200 and plain[128, 235, 2] > 200  # left red, right blue
    assert prepare_image(data).converted is None
    upright = prepare_image(data, exif_orientation=True)
    rotated = decoded(upright)
    assert rotated[20, 128, 0] > 200 and rotated[235, 128, 2] > 200  # top red, bottom blue
    assert upright.converted == "EXIF orientation 6 applied"
    assert prepare_image(_oriented(1), exif_orientation=True).converted is None


# TIFF field types of an EXIF entry: what a writer may have put in the Orientation tag
ASCII, SHORT, RATIONAL, DOUBLE = 2, 3, 5, 12


def _oriented_as(kind: int, value: bytes) -> bytes:
    """`_oriented`'s JPEG with an EXIF Orientation of TIFF field type `kind`, whatever
    its value (PIL's writer makes every Orientation a SHORT)."""
    count = len(value) if kind == ASCII else 1
    ifd_end = 8 + 2 + 12 + 4  # header, entry count, one entry, next-IFD offset
    field = value.ljust(4, b"\0") if len(value) <= 4 else struct.pack("<I", ifd_end)
    tiff = b"II*\0" + struct.pack("<IHHHI", 8, 1, 0x0112, kind, count) + field + bytes(4)
    tiff += b"" if len(value) <= 4 else value
    image = Image.open(io.BytesIO(_oriented(1)))
    return encode(image, "JPEG", exif=b"Exif\0\0" + tiff)


@pytest.mark.parametrize(
    ("kind", "value", "shown"),
    [
        (ASCII, b"x\0", "'x'"),  # int() raised: a readable photo skipped as corrupt
        (ASCII, b"6\0", "'6'"),  # int() passed: "applied", nothing turned
        (RATIONAL, struct.pack("<II", 13, 2), "6.5"),
        (DOUBLE, struct.pack("<d", 6.5), "6.5"),
        (SHORT, struct.pack("<H", 9), "9"),
    ],
    ids=["ascii-x", "ascii-6", "rational-6.5", "double-6.5", "short-9"],
)
def test_an_unusable_exif_orientation_is_ignored_and_noted(kind, value, shown):
    data = _oriented_as(kind, value)
    prepared = prepare_image(data, exif_orientation=True)
    assert prepared.converted == f"EXIF orientation unusable, ignored ({shown})"
    assert prepared.jpeg == prepare_image(data).jpeg  # as stored: not turned
    # the same file with a SHORT 6, as a camera writes it, is turned and noted
    six = prepare_image(_oriented_as(SHORT, struct.pack("<H", 6)), exif_orientation=True)
    assert six.converted == "EXIF orientation 6 applied" and six.jpeg != prepared.jpeg


def test_a_multi_picture_jpeg_is_its_primary_image_not_a_multi_frame_file():
    # Cameras and phones write MPO: a JPEG whose primary image is followed by others
    # (a second view, a depth or gain map). It is prepared as that JPEG, whatever
    # prepare.frames says, with the same reduced-size decode.
    primary, other = photo(600, 520, seed=3), Image.new("RGB", (300, 260), (0, 255, 0))
    data = encode(primary, "MPO", save_all=True, append_images=[other])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    for frames in ("first", "skip"):
        prepared = prepare_image(data, ".jpg", frames=frames)
        assert prepared.converted is None
        assert prepared.jpeg == prepare_image(encode(primary, "JPEG"), ".jpg").jpeg


def test_animated_and_multipage_files_give_their_first_frame_or_are_skipped():
    frames = [Image.new("RGB", (300, 260), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    for fmt, extension in (("GIF", ".gif"), ("PNG", ".png"), ("TIFF", ".tif")):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:])
        prepared = prepare_image(data, extension)
        assert prepared.converted.endswith("first of 2 frames"), fmt
        assert decoded(prepared)[128, 128, 0] > 200 and decoded(prepared)[128, 128, 1] < 60
        with pytest.raises(BadImage, match=r"2 frames \(params prepare.frames: skip\)"):
            prepare_image(data, extension, frames="skip")


def _linear_rgb_profile() -> bytes:
    """A minimal ICC v2 RGB display profile: sRGB's primaries (D50-adapted) with a linear
    tone curve, so that its values differ from sRGB's in every midtone."""
    return _linear_profile(b"RGB ")


def _linear_profile(space: bytes) -> bytes:
    """A minimal ICC v2 display profile of colour space `space` (b"RGB " or b"GRAY") with
    a linear tone curve: for RGB, sRGB's primaries (D50-adapted)."""
    import struct

    def s15(value: float) -> bytes:
        return struct.pack(">i", round(value * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + bytes(4) + s15(x) + s15(y) + s15(z)

    text = b"linear\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 2 + 1 + 67)
    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, 0x0100) + bytes(2)  # gamma 1.0
    tags = [(b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249))]
    if space == b"GRAY":
        tags.append((b"kTRC", curve))
    else:
        tags += [
            (b"rXYZ", xyz(0.4361, 0.2225, 0.0139)),
            (b"gXYZ", xyz(0.3851, 0.7169, 0.0971)),
            (b"bXYZ", xyz(0.1431, 0.0606, 0.7141)),
            (b"rTRC", curve),
            (b"gTRC", curve),
            (b"bTRC", curve),
        ]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for signature, data in tags:
        data += bytes(-len(data) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (
        struct.pack(">I", size)
        + bytes(4)
        + bytes([2, 0x10, 0, 0])
        + b"mntr"
        + space
        + b"XYZ "
        + bytes(12)
        + b"acsp"
        + bytes(24)
        + bytes(4)
        + s15(0.9642)
        + s15(1.0)
        + s15(0.8249)
        + bytes(4 + 16 + 28)
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def test_icc_profile_is_dropped_by_default_and_converted_to_srgb_when_set():
    from PIL import ImageCms, features

    profile = _linear_rgb_profile()
    image = photo(300, 260, seed=5)
    tagged = encode(image, "PNG", icc_profile=profile)
    # Default: the stored values, as if there were no profile (the original pipeline).
    assert prepare_image(tagged, ".png").jpeg == prepare_image(encode(image, "PNG"), ".png").jpeg
    if not features.check("littlecms2"):  # a PIL built without liblcms2-dev (CI has it)
        with pytest.raises(BadImage, match=re.escape(missing_codec_hint("littlecms2"))):
            prepare_image(tagged, ".png", icc_to_srgb=True)
        return
    converted = prepare_image(tagged, ".png", icc_to_srgb=True)
    assert converted.converted == "PNG, ICC profile to sRGB"
    # Equal to LittleCMS's transform of the whole image, then prepared as any PNG.
    source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    srgb = ImageCms.createProfile("sRGB")
    direct = ImageCms.profileToProfile(image, source, srgb, outputMode="RGB")
    assert converted.jpeg == prepare_image(encode(direct, "PNG"), ".png").jpeg
    difference = decoded(converted) - decoded(prepare_image(tagged, ".png"))
    assert difference.mean() > 20  # linear-light values are much brighter in sRGB
    # A profile that does not fit the pixels (LAB on RGB) is ignored and reported.
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    note = prepare_image(encode(image, "PNG", icc_profile=lab), ".png", icc_to_srgb=True)
    assert note.converted.startswith("PNG, ICC profile unusable, ignored")


def test_a_profile_littlecms_cannot_read_is_ignored_and_reported(monkeypatch):
    # LittleCMS refuses a damaged profile with an OSError ("cannot open profile from
    # string"), not a PyCMSError: the image is still kept, as if it had no profile.
    from PIL import features

    if not features.check("littlecms2"):  # this PIL has no ImageCms: one that raises so
        fake = types.ModuleType("PIL.ImageCms")
        fake.PyCMSError = type("PyCMSError", (Exception,), {})

        def unreadable(source):
            raise OSError("cannot open profile from string")

        fake.ImageCmsProfile = unreadable
        monkeypatch.setitem(sys.modules, "PIL.ImageCms", fake)
        monkeypatch.setattr("PIL.ImageCms", fake, raising=False)
    image = photo(300, 260, seed=6)
    damaged = encode(image, "PNG", icc_profile=b"acsp" + bytes(200))
    prepared = prepare_image(damaged, ".png", icc_to_srgb=True)
    assert prepared.converted.startswith("PNG, ICC profile unusable, ignored (")
    assert prepared.jpeg == prepare_image(encode(image, "PNG"), ".png").jpeg


@pytest.mark.parametrize(
    ("kind", "value"),
    [(RATIONAL, struct.pack("<II", 6, 1)), (DOUBLE, struct.pack("<d", 6.0))],
    ids=["rational-6/1", "double-6.0"],
)
def test_a_whole_orientation_of_another_type_turns_as_a_short_does(kind, value):
    # PIL turns by 6/1 and 6.0 as by 6 (they equal it): not "unusable"
    six = prepare_image(_oriented_as(SHORT, struct.pack("<H", 6)), exif_orientation=True)
    prepared = prepare_image(_oriented_as(kind, value), exif_orientation=True)
    assert prepared.jpeg == six.jpeg and prepared.converted.endswith(" applied")
