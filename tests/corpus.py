"""A fuzz corpus for the prepare stage (issue 14, point 7), made by the tests themselves.

Every format this Pillow can write, in the modes and options that take other decoder
paths (JPEG L/RGB/CMYK, subsampling, progressive, ICC, EXIF orientation; PNG 1-bit to
16-bit, palettes with transparency, APNG; GIF; BMP; TIFF; ...), then damaged copies of
some of them: truncated, bytes flipped, misnamed, empty, a declared size far beyond
`max_pixels`, random bytes. Everything is deterministic (fixed seeds, no clock), small
(a few hundred files of at most ~1100 px on a side), so a prepare run over it is cheap.

A format whose `save` raises in this Pillow (codec not built in) is left out and named
in `Corpus.unwritable`, with the error.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

SEED = 14_7  # issue 14, point 7
CLASSES = ("n00000000", "n00000001")
SPLITS = ("train", "val")
NORMAL_PER_FOLDER = 3  # plain RGB JPEGs in each split/class folder

# Sizes that cycle over the originals: small, some not square.
SIZES = [(40, 40), (64, 48), (48, 80), (120, 90), (97, 61), (33, 119), (80, 80), (71, 43)]


@dataclass(frozen=True)
class Entry:
    name: str  # file name, extension included (unique in the corpus)
    kind: str  # "<category>: <detail>", e.g. "original: PNG LA", "truncated 1/3: GIF"
    data: bytes

    @property
    def category(self) -> str:
        return self.kind.split(":", 1)[0]


@dataclass
class Corpus:
    entries: list[Entry] = field(default_factory=list)
    unwritable: dict[str, str] = field(default_factory=dict)  # name: "Error: message"


# --- content ------------------------------------------------------------------------


def pixels(width: int, height: int, seed: int, channels: int = 3) -> np.ndarray:
    """Gradients in random directions plus noise, uint8 HxWxC."""
    rng = np.random.default_rng([SEED, seed])
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    planes = []
    for _ in range(channels):
        fx, fy = rng.uniform(-3, 3, 2) * 255 / max(width, height, 2)
        planes.append(x * fx + y * fy + rng.uniform(0, 255))
    gradient = np.abs((np.stack(planes, -1) % 510) - 255)
    noise = rng.normal(0, 14, gradient.shape)
    return (gradient + noise).clip(0, 255).astype(np.uint8)


def rgb(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(pixels(width, height, seed), "RGB")


def in_mode(mode: str, width: int, height: int, seed: int) -> Image.Image:
    """A content-bearing image in any mode Pillow can hold."""
    base = rgb(width, height, seed)
    if mode in ("RGB", "L", "1", "CMYK", "YCbCr"):
        return base.convert(mode)
    if mode == "P":
        return base.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    alpha = Image.fromarray(pixels(width, height, seed + 1000, 1)[:, :, 0], "L")
    if mode in ("RGBA", "LA"):
        image = base.convert(mode[:-1])
        image.putalpha(alpha)
        return image
    if mode == "I;16":
        wide = pixels(width, height, seed, 1)[:, :, 0].astype("<u2") * 257
        return Image.frombytes("I;16", (width, height), wide.tobytes())
    if mode == "I":
        wide = pixels(width, height, seed, 1)[:, :, 0].astype(np.int32) * 4000 - 300_000
        return Image.fromarray(wide)
    if mode == "F":
        return Image.fromarray(pixels(width, height, seed, 1)[:, :, 0].astype(np.float32) / 7.5)
    if mode == "LAB":
        bands = [
            Image.fromarray(pixels(width, height, seed + i, 1)[:, :, 0], "L") for i in range(3)
        ]
        return Image.merge("LAB", bands)
    raise ValueError(mode)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def frames(count: int, width: int, height: int, seed: int, mode: str = "RGB") -> list[Image.Image]:
    return [in_mode(mode, width, height, seed + 10 * i) for i in range(count)]


def icc_profile() -> bytes:
    """sRGB from LittleCMS when this Pillow has it, else a minimal, well-formed ICC v2
    display profile (a header and an empty tag table)."""
    try:
        from PIL import ImageCms

        made = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
        # LittleCMS stamps the creation time (and an MD5 over it): fix the date, and
        # zero the ID ("not computed") so the bytes are the same on every run.
        made[24:36] = struct.pack(">6H", 2000, 1, 1, 0, 0, 0)
        made[84:100] = bytes(16)
        return bytes(made)
    except (ImportError, OSError, ValueError, AttributeError):
        pass
    header = bytearray(128)
    struct.pack_into(">I4sI4s4s4s", header, 0, 132, b"none", 0x02100000, b"mntr", b"RGB ", b"XYZ ")
    header[36:40] = b"acsp"
    struct.pack_into(">iii", header, 68, 63190, 65536, 54061)  # D50 illuminant
    return bytes(header) + struct.pack(">I", 0)


def exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


# --- originals ----------------------------------------------------------------------

Maker = Callable[[tuple[int, int], int], bytes]


def _originals() -> list[tuple[str, str, Maker]]:
    """(file name, kind detail, maker(size, seed) -> bytes); size from SIZES unless the
    maker ignores it."""

    def save(mode: str, fmt: str, **options) -> Maker:
        return lambda size, seed: encode(in_mode(mode, *size, seed), fmt, **options)

    def sized(width: int, height: int, mode: str, fmt: str, **options) -> Maker:
        return lambda _, seed: encode(in_mode(mode, width, height, seed), fmt, **options)

    def animated(fmt: str, count: int, mode: str = "RGB", **options) -> Maker:
        def make(size, seed):
            first, *rest = frames(count, *size, seed, mode)
            return encode(first, fmt, save_all=True, append_images=rest, **options)

        return make

    def icns(size, seed):
        # Every size ICNS stores (up to 1024) given as a blocky upscale: the default,
        # resampled ones cost seconds of PNG encoding.
        image = in_mode("RGBA", *size, seed)
        sizes = (32, 64, 128, 256, 512, 1024)
        larger = [image.resize((s, s), Image.Resampling.NEAREST) for s in sizes]
        return encode(image, "ICNS", append_images=larger)

    icc = icc_profile()
    items: list[tuple[str, str, Maker]] = [
        # JPEG: modes, chroma subsampling, progressive, optimized, ICC, EXIF, sizes
        ("jpeg_L.jpg", "JPEG L", save("L", "JPEG", quality=90)),
        ("jpeg_CMYK.jpg", "JPEG CMYK (Adobe)", save("CMYK", "JPEG", quality=90)),
        ("jpeg_YCbCr.jpg", "JPEG from YCbCr", save("YCbCr", "JPEG")),
        ("jpeg_444.jpg", "JPEG 4:4:4", save("RGB", "JPEG", subsampling="4:4:4")),
        ("jpeg_422.jpg", "JPEG 4:2:2", save("RGB", "JPEG", subsampling="4:2:2")),
        ("jpeg_420.jpg", "JPEG 4:2:0", save("RGB", "JPEG", subsampling="4:2:0")),
        ("jpeg_progressive.jpg", "JPEG progressive", save("RGB", "JPEG", progressive=True)),
        ("jpeg_progressive_L.jpg", "JPEG progressive L", save("L", "JPEG", progressive=True)),
        (
            "jpeg_progressive_CMYK.jpg",
            "JPEG progressive CMYK",
            save("CMYK", "JPEG", progressive=True),
        ),
        ("jpeg_optimized.jpg", "JPEG optimized", save("RGB", "JPEG", optimize=True)),
        ("jpeg_q1.jpg", "JPEG quality 1", save("RGB", "JPEG", quality=1)),
        ("jpeg_q100.jpg", "JPEG quality 100", save("RGB", "JPEG", quality=100)),
        ("jpeg_restart.jpg", "JPEG restart markers", save("RGB", "JPEG", restart_marker_rows=1)),
        ("jpeg_icc.jpg", "JPEG with ICC", save("RGB", "JPEG", icc_profile=icc)),
        ("jpeg_icc_CMYK.jpg", "JPEG CMYK with ICC", save("CMYK", "JPEG", icc_profile=icc)),
        ("jpeg_1x1.jpg", "JPEG 1x1", sized(1, 1, "RGB", "JPEG")),
        ("jpeg_3x500.jpg", "JPEG 3x500", sized(3, 500, "RGB", "JPEG")),
        ("jpeg_500x3.jpg", "JPEG 500x3", sized(500, 3, "RGB", "JPEG")),
        ("jpeg_300x520.jpg", "JPEG 300x520", sized(300, 520, "RGB", "JPEG")),
        ("jpeg_1100x560.jpg", "JPEG 1100x560 (DCT draft)", sized(1100, 560, "RGB", "JPEG")),
        ("jpeg_1100x560_CMYK.jpg", "JPEG 1100x560 CMYK", sized(1100, 560, "CMYK", "JPEG")),
        ("mpo_2.mpo", "MPO 2 frames", animated("MPO", 2)),
        # PNG: every bit depth and colour type Pillow writes
        ("png_1bit.png", "PNG 1-bit", save("1", "PNG")),
        ("png_L.png", "PNG L", save("L", "PNG")),
        ("png_LA.png", "PNG LA", save("LA", "PNG")),
        ("png_P.png", "PNG palette", save("P", "PNG")),
        ("png_P_4bit.png", "PNG palette 4-bit", save("P", "PNG", bits=4)),
        ("png_P_transparency.png", "PNG palette + tRNS", save("P", "PNG", transparency=0)),
        ("png_RGB.png", "PNG RGB", save("RGB", "PNG")),
        ("png_RGB_tRNS.png", "PNG RGB + tRNS", save("RGB", "PNG", transparency=(0, 0, 0))),
        ("png_RGBA.png", "PNG RGBA", save("RGBA", "PNG")),
        ("png_I16.png", "PNG 16-bit grey", save("I;16", "PNG")),
        ("png_icc.png", "PNG with ICC", save("RGB", "PNG", icc_profile=icc)),
        ("png_exif6.png", "PNG EXIF orientation 6", save("RGB", "PNG", exif=exif_orientation(6))),
        ("png_1x1.png", "PNG 1x1", sized(1, 1, "RGBA", "PNG")),
        ("png_500x3.png", "PNG 500x3", sized(500, 3, "RGB", "PNG")),
        ("png_300x520.png", "PNG 300x520", sized(300, 520, "RGB", "PNG")),
        ("apng_3.png", "APNG 3 frames", animated("PNG", 3, duration=100, loop=0)),
        ("apng_RGBA.png", "APNG RGBA 3 frames", animated("PNG", 3, "RGBA", disposal=1, blend=1)),
        # GIF
        ("gif_plain.gif", "GIF", save("P", "GIF")),
        ("gif_L.gif", "GIF from L", save("L", "GIF")),
        ("gif_transparent.gif", "GIF transparent", save("P", "GIF", transparency=0)),
        ("gif_1x1.gif", "GIF 1x1", sized(1, 1, "P", "GIF")),
        ("gif_animated.gif", "GIF animated 4 frames", animated("GIF", 4, "P", duration=80, loop=0)),
        # BMP / DIB
        ("bmp_1.bmp", "BMP 1-bit", save("1", "BMP")),
        ("bmp_8_L.bmp", "BMP 8-bit grey", save("L", "BMP")),
        ("bmp_8_P.bmp", "BMP 8-bit palette", save("P", "BMP")),
        ("bmp_24.bmp", "BMP 24-bit", save("RGB", "BMP")),
        ("bmp_32.bmp", "BMP 32-bit", save("RGBA", "BMP")),
        ("bmp_3x500.bmp", "BMP 3x500", sized(3, 500, "RGB", "BMP")),
        ("dib_24.dib", "DIB 24-bit", save("RGB", "DIB")),
        # TIFF
        ("tiff_1bit.tif", "TIFF 1-bit", save("1", "TIFF")),
        ("tiff_L.tif", "TIFF L", save("L", "TIFF")),
        ("tiff_P.tif", "TIFF palette", save("P", "TIFF")),
        ("tiff_RGBA.tif", "TIFF RGBA", save("RGBA", "TIFF")),
        ("tiff_I16.tif", "TIFF 16-bit", save("I;16", "TIFF")),
        ("tiff_I32.tif", "TIFF 32-bit int", save("I", "TIFF")),
        ("tiff_F.tif", "TIFF float", save("F", "TIFF")),
        ("tiff_CMYK.tif", "TIFF CMYK", save("CMYK", "TIFF")),
        ("tiff_LAB.tif", "TIFF LAB", save("LAB", "TIFF")),
        ("tiff_icc.tif", "TIFF with ICC", save("RGB", "TIFF", icc_profile=icc)),
        ("tiff_multipage.tif", "TIFF 3 pages", animated("TIFF", 3)),
    ]
    for compression in (
        "raw",
        "tiff_lzw",
        "tiff_deflate",
        "packbits",
        "jpeg",
        "tiff_adobe_deflate",
    ):
        name = f"tiff_{compression}.tif"
        items.append((name, f"TIFF {compression}", save("RGB", "TIFF", compression=compression)))
    items += [
        # WebP, JPEG 2000 (only where this Pillow has the codec)
        ("webp_lossy.webp", "WebP lossy", save("RGB", "WEBP", quality=80)),
        ("webp_lossless.webp", "WebP lossless", save("RGBA", "WEBP", lossless=True)),
        ("webp_animated.webp", "WebP animated", animated("WEBP", 3, duration=100)),
        ("jp2_RGB.jp2", "JPEG 2000 (jp2)", save("RGB", "JPEG2000")),
        ("j2k_L.j2k", "JPEG 2000 codestream", save("L", "JPEG2000")),
        # Netpbm
        ("ppm_RGB.ppm", "PPM", save("RGB", "PPM")),
        ("pgm_L.pgm", "PGM", save("L", "PPM")),
        ("pgm_16.pgm", "PGM 16-bit", save("I;16", "PPM")),
        ("pbm_1.pbm", "PBM", save("1", "PPM")),
        ("pfm_F.pfm", "PFM float", save("F", "PPM")),
        # the rest of Pillow's writers
        ("tga_RGB.tga", "TGA RGB", save("RGB", "TGA")),
        ("tga_RGBA_rle.tga", "TGA RGBA RLE", save("RGBA", "TGA", rle=True)),
        ("tga_L.tga", "TGA L", save("L", "TGA")),
        ("tga_P.tga", "TGA palette", save("P", "TGA")),
        ("ico_RGBA.ico", "ICO", save("RGBA", "ICO", sizes=[(16, 16), (32, 32), (48, 48)])),
        ("icns_RGBA.icns", "ICNS", icns),
        ("pcx_RGB.pcx", "PCX RGB", save("RGB", "PCX")),
        ("pcx_L.pcx", "PCX L", save("L", "PCX")),
        ("pcx_P.pcx", "PCX palette", save("P", "PCX")),
        ("pcx_1.pcx", "PCX 1-bit", save("1", "PCX")),
        ("sgi_RGB.sgi", "SGI RGB", save("RGB", "SGI")),
        ("sgi_L.sgi", "SGI L", save("L", "SGI")),
        ("sgi_RGBA.sgi", "SGI RGBA", save("RGBA", "SGI")),
        ("sgi_16.sgi", "SGI 16-bit", save("RGB", "SGI", bpc=2)),
        ("dds_RGB.dds", "DDS RGB", save("RGB", "DDS")),
        ("dds_RGBA.dds", "DDS RGBA", save("RGBA", "DDS")),
        ("dds_L.dds", "DDS L", save("L", "DDS")),
        ("dds_LA.dds", "DDS LA", save("LA", "DDS")),
        ("dds_DXT1.dds", "DDS DXT1", save("RGBA", "DDS", pixel_format="DXT1")),
        ("dds_DXT5.dds", "DDS DXT5", save("RGBA", "DDS", pixel_format="DXT5")),
        ("dds_BC5.dds", "DDS BC5", save("RGB", "DDS", pixel_format="BC5")),
        ("im_RGB.im", "IM RGB", save("RGB", "IM")),
        ("im_L.im", "IM L", save("L", "IM")),
        ("im_P.im", "IM palette", save("P", "IM")),
        ("im_I.im", "IM 32-bit int", save("I", "IM")),
        ("im_F.im", "IM float", save("F", "IM")),
        ("spider_F.spi", "SPIDER", save("F", "SPIDER")),
        ("xbm_1.xbm", "XBM", save("1", "XBM")),
        ("msp_1.msp", "MSP", save("1", "MSP")),
        ("blp_P.blp", "BLP2 palette", save("P", "BLP")),
        ("blp1_P.blp", "BLP1 palette", save("P", "BLP", blp_version="BLP1")),
        ("qoi_RGB.qoi", "QOI RGB", save("RGB", "QOI")),
        ("qoi_RGBA.qoi", "QOI RGBA", save("RGBA", "QOI")),
        ("palm_1.palm", "Palm (write-only in Pillow)", save("1", "PALM")),
        ("palm_P.palm", "Palm palette (write-only)", save("P", "PALM")),
    ]
    return items


EXIF_BASE = (90, 60)  # not square, so a rotation changes the shape


def originals() -> tuple[list[Entry], dict[str, str]]:
    entries, unwritable = [], {}
    makers = _originals()
    for orientation in range(1, 9):
        make = lambda _, seed, o=orientation: encode(  # noqa: E731
            rgb(*EXIF_BASE, seed), "JPEG", exif=exif_orientation(o)
        )
        makers.append((f"jpeg_exif{orientation}.jpg", f"JPEG EXIF orientation {orientation}", make))
    for index, (name, detail, make) in enumerate(makers):
        try:
            data = make(SIZES[index % len(SIZES)], index)
        except Exception as error:  # the codec is not in this Pillow
            unwritable[name] = f"{type(error).__name__}: {error}"
            continue
        entries.append(Entry(name, f"original: {detail}", data))
    return entries, unwritable


# --- damaged copies -------------------------------------------------------------------

MUTATED = [  # the originals that get truncated and bit-flipped copies
    "jpeg_420.jpg",
    "jpeg_progressive.jpg",
    "jpeg_CMYK.jpg",
    "png_RGB.png",
    "png_P_transparency.png",
    "png_I16.png",
    "apng_3.png",
    "gif_animated.gif",
    "bmp_24.bmp",
    "bmp_8_P.bmp",
    "tiff_raw.tif",
    "tiff_multipage.tif",
    "ppm_RGB.ppm",
    "tga_RGBA_rle.tga",
    "ico_RGBA.ico",
    "pcx_RGB.pcx",
    "sgi_RGB.sgi",
    "dds_DXT1.dds",
    "qoi_RGB.qoi",
    "im_RGB.im",
    # native codecs, where this Pillow has them (libtiff, libwebp, OpenJPEG)
    "tiff_tiff_lzw.tif",
    "tiff_jpeg.tif",
    "webp_lossy.webp",
    "jp2_RGB.jp2",
]


HEADER_FLIPS = 4  # copies with 1 or 2 bytes flipped in the first 64 (or first quarter)


def _stable_seed(text: str) -> int:
    return zlib.crc32(text.encode())  # not hash(): that one changes per process


def flipped(data: bytes, start: int, stop: int, count: int, seed: int) -> bytes:
    """`count` bytes in [start, stop) XOR-ed with non-zero values."""
    rng = np.random.default_rng([SEED, seed])
    out = bytearray(data)
    for position in rng.integers(start, max(stop, start + 1), count):
        out[position] ^= int(rng.integers(1, 256))
    return bytes(out)


def _split_name(name: str) -> tuple[str, str]:
    stem, _, extension = name.rpartition(".")
    return stem, extension


def mutations(by_name: dict[str, bytes]) -> list[Entry]:
    entries = []
    for name in MUTATED:
        if name not in by_name:
            continue
        data, (stem, extension) = by_name[name], _split_name(name)
        size = len(data)
        cuts = {"header": min(12, size // 2), "1/3": size // 3, "2/3": 2 * size // 3}
        cuts["last byte"] = size - 1
        for label, cut in cuts.items():
            tag = label.replace("/", "of").replace(" ", "")
            entries.append(
                Entry(f"{stem}_cut{tag}.{extension}", f"truncated {label}: {name}", data[:cut])
            )
        header = min(64, size // 4)
        for variant in range(HEADER_FLIPS):
            seed = _stable_seed(f"{name}/header/{variant}")
            entries.append(
                Entry(
                    f"{stem}_fliphead{variant}.{extension}",
                    f"flipped header: {name}",
                    flipped(data, 0, header, 1 + variant % 2, seed),
                )
            )
        for variant in range(2):
            seed = _stable_seed(f"{name}/body/{variant}")
            entries.append(
                Entry(
                    f"{stem}_flipbody{variant}.{extension}",
                    f"flipped body: {name}",
                    flipped(data, header, size, 4 + 12 * variant, seed),
                )
            )
    misnamed = [
        ("png_RGB.png", "png_as.jpg"),
        ("png_RGBA.png", "png_rgba_as.jpeg"),
        ("jpeg_420.jpg", "jpeg_as.png"),
        ("gif_plain.gif", "gif_as.jpg"),
        ("bmp_24.bmp", "bmp_as.png"),
        ("tiff_raw.tif", "tiff_as.jpg"),
        ("webp_lossy.webp", "webp_as.jpg"),
    ]
    for original, new_name in misnamed:
        if original in by_name:
            entries.append(Entry(new_name, f"misnamed: {original}", by_name[original]))
    entries += [
        Entry("text_as.jpg", "misnamed: text", b"This is not an image.\nJust some text.\n"),
        Entry(
            "html_as.jpg",
            "misnamed: HTML error page",
            b"<!DOCTYPE html><html><head><title>404 Not Found</title></head>"
            b"<body><h1>Not Found</h1></body></html>\n",
        ),
        Entry("empty.jpg", "empty: .jpg", b""),
        Entry("empty.png", "empty: .png", b""),
        Entry("bomb_png.png", "bomb: PNG 100000x100000", png_bomb(100_000, 100_000)),
        Entry("bomb_bmp.bmp", "bomb: BMP 100000x100000", bmp_bomb(100_000, 100_000)),
        Entry("bomb_gif.gif", "bomb: GIF 65535x65535", gif_bomb(65535, 65535)),
        Entry("bomb_jpeg.jpg", "bomb: JPEG 65500x65500", jpeg_bomb(by_name["jpeg_420.jpg"])),
    ]
    rng = np.random.default_rng([SEED, 99])
    prefixes = {
        "": b"",
        "jpeg": b"\xff\xd8\xff\xe0",
        "png": b"\x89PNG\r\n\x1a\n",
        "gif": b"GIF89a",
        "bmp": b"BM",
        "tiff": b"II*\x00",
    }
    for label, prefix in prefixes.items():
        for length in (1, 100, 5000):
            if label and length == 1:
                continue
            body = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
            name = f"random_{label or 'bytes'}_{length}.{'bin' if not label else 'jpg'}"
            entries.append(Entry(name, f"random: {label or 'bytes'} {length}", prefix + body))
    return entries


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header (right CRCs) declaring width x height RGB, with one short row."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x80" * 30)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def bmp_bomb(width: int, height: int) -> bytes:
    """A BMP header declaring width x height 24-bit, with a few bytes of pixels."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    pixels_ = b"\x80" * 64
    header = struct.pack("<2sIHHI", b"BM", 14 + len(info) + len(pixels_), 0, 0, 14 + len(info))
    return header + info + pixels_


def gif_bomb(width: int, height: int) -> bytes:
    """A GIF whose screen and only image are width x height, with a tiny LZW stream."""
    screen = (
        b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00" * 3 + b"\xff" * 3
    )
    image = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return screen + image + b"\x02\x02\x44\x01\x00" + b"\x3b"


def png_raw(pixels_: np.ndarray, color_type: int, interlaced: bool = False) -> bytes:
    """A PNG written by hand (filter 0 on every row), for what Pillow does not write:
    16 bits per channel colour, Adam7 interlacing. `pixels_` is HxWxC uint8 or >u2."""
    height, width = pixels_.shape[:2]
    depth = 16 if pixels_.dtype.itemsize == 2 else 8
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4)]
    passes += [(1, 0, 2, 2), (0, 1, 1, 2)]
    raw = b""
    for x0, y0, dx, dy in passes if interlaced else [(0, 0, 1, 1)]:
        sub = pixels_[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\x00" + row.tobytes() for row in sub)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, int(interlaced))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def bmp_raw(width: int, height: int, bits: int, rows: list[bytes], palette: bytes = b"") -> bytes:
    """An uncompressed bottom-up BMP written by hand (rows top first, unpadded)."""
    stride = (width * bits + 31) // 32 * 4
    body = b"".join(row.ljust(stride, b"\x00") for row in reversed(rows))
    colours = len(palette) // 4
    info = struct.pack(
        "<IiiHHIIiiII", 40, width, height, 1, bits, 0, len(body), 2835, 2835, colours, 0
    )
    offset = 14 + len(info) + len(palette)
    return struct.pack("<2sIHHI", b"BM", offset + len(body), 0, 0, offset) + info + palette + body


def crafted(by_name: dict[str, bytes]) -> list[Entry]:
    """Files Pillow does not write but the world has (16-bit colour PNG, interlaced PNG,
    4- and 16-bit BMP), and headers patched to values a decoder may not support."""
    width, height = 57, 43
    colour = pixels(width, height, 700, 4)
    wide = colour.astype(">u2") * 257
    entries = [
        Entry("png_RGB48.png", "crafted: PNG 16-bit RGB", png_raw(wide[:, :, :3], 2)),
        Entry("png_RGBA64.png", "crafted: PNG 16-bit RGBA", png_raw(wide, 6)),
        Entry("png_interlaced.png", "crafted: PNG Adam7", png_raw(colour[:, :, :3], 2, True)),
        Entry(
            "png_LA16_interlaced.png",
            "crafted: PNG Adam7 16-bit LA",
            png_raw(wide[:, :, :2], 4, True),
        ),
        Entry("png_zero_width.png", "crafted: PNG 0x43", png_bomb(0, 43)),
    ]
    r, g, b = (colour[:, :, i].astype("<u2") >> 3 for i in range(3))
    rgb555 = (r << 10) | (g << 5) | b
    entries.append(
        Entry(
            "bmp_16.bmp",
            "crafted: BMP 16-bit 5-5-5",
            bmp_raw(width, height, 16, [row.tobytes() for row in rgb555]),
        )
    )
    index = colour[:, :, 0] >> 4
    packed = [bytes((row[0::2] << 4) | np.append(row[1::2], 0)[: len(row[0::2])]) for row in index]
    palette = b"".join(bytes((16 * i, 255 - 16 * i, 8 * i, 0)) for i in range(16))
    entries.append(
        Entry("bmp_4.bmp", "crafted: BMP 4-bit", bmp_raw(width, height, 4, packed, palette))
    )
    if "bmp_24.bmp" in by_name:
        for field_, offset, value, fmt in (
            ("depth7", 28, 7, "<H"),
            ("depth64", 28, 64, "<H"),
            ("compression99", 30, 99, "<I"),
        ):
            data = bytearray(by_name["bmp_24.bmp"])
            struct.pack_into(fmt, data, offset, value)
            entries.append(Entry(f"bmp_{field_}.bmp", f"crafted: BMP header {field_}", bytes(data)))
    if "dds_DXT1.dds" in by_name:
        data = bytearray(by_name["dds_DXT1.dds"])
        data[84:88] = b"ZZZZ"  # the pixel format's FourCC
        entries.append(Entry("dds_fourcc_ZZZZ.dds", "crafted: DDS unknown FourCC", bytes(data)))
    if "tiff_raw.tif" in by_name:
        for compression, label in ((5, "lzw"), (7, "jpeg"), (34712, "jpeg2000"), (999, "999")):
            data = tiff_with_tag(by_name["tiff_raw.tif"], 259, compression)
            entries.append(
                Entry(
                    f"tiff_says_{label}.tif",
                    f"crafted: TIFF tagged compression {compression}",
                    data,
                )
            )
    return entries


def tiff_with_tag(data: bytes, tag: int, value: int) -> bytes:
    """A little-endian TIFF with the SHORT value of `tag` in its first IFD replaced."""
    out = bytearray(data)
    (ifd,) = struct.unpack_from("<I", out, 4)
    (count,) = struct.unpack_from("<H", out, ifd)
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        if struct.unpack_from("<H", out, entry)[0] == tag:
            struct.pack_into("<H", out, entry + 8, value)
            return bytes(out)
    raise ValueError(f"tag {tag} not in the first IFD")


def jpeg_bomb(data: bytes) -> bytes:
    """A real JPEG whose frame header (SOF0) declares 65500x65500."""
    at = data.index(b"\xff\xc0")
    out = bytearray(data)
    struct.pack_into(">HH", out, at + 5, 65500, 65500)
    return bytes(out)


# --- the corpus -----------------------------------------------------------------------


def build_corpus() -> Corpus:
    """Every entry, in a fixed order (nothing cached: build it twice to compare)."""
    entries, unwritable = originals()
    by_name = {e.name: e.data for e in entries}
    entries += crafted(by_name) + mutations(by_name)
    names = [e.name for e in entries]
    assert len(names) == len(set(names)), "corpus file names must be unique"
    return Corpus(entries, unwritable)


def normal_jpeg(index: int) -> bytes:
    return encode(rgb(*SIZES[index % len(SIZES)], 5000 + index), "JPEG", quality=90)


def layout(corpus: Corpus) -> dict[str, Entry]:
    """relpath -> entry: the corpus dealt round-robin over the split/class folders, each
    folder also holding NORMAL_PER_FOLDER plain JPEGs."""
    folders = [f"{split}/{wnid}" for split in SPLITS for wnid in CLASSES]
    placed = {}
    for index, entry in enumerate(corpus.entries):
        placed[f"{folders[index % len(folders)]}/{entry.name}"] = entry
    for f, folder in enumerate(folders):
        for i in range(NORMAL_PER_FOLDER):
            name = f"normal_{i}.JPEG"
            placed[f"{folder}/{name}"] = Entry(name, "normal: JPEG", normal_jpeg(f * 10 + i))
    return placed


def write_corpus(folder: Path, corpus: Corpus | None = None) -> dict[str, str]:
    """Write the corpus as an ImageFolder dataset (train/<wnid>/..., val/<wnid>/...) under
    `folder`; returns {relpath: kind} of every file written."""
    corpus = corpus or build_corpus()
    kinds = {}
    for relpath, entry in layout(corpus).items():
        path = folder / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(entry.data)
        kinds[relpath] = entry.kind
    return kinds


def unwritable() -> dict[str, str]:
    """The originals this Pillow could not write: {file name: error}."""
    return originals()[1]


def pil_can_use(data: bytes) -> bool:
    """Whether Pillow itself can open the data, `load()` it and `convert("RGB")` it
    without an exception, into an image of at least one pixel. Pillow's own limits apply
    as they stand: `Image.MAX_IMAGE_PIXELS` (a decompression bomb *warning* is not a
    failure, its error is) and truncated files refused (`LOAD_TRUNCATED_IMAGES` False,
    its default and what `alexnet.runtime.configure` sets)."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                converted = image.convert("RGB")
                return converted.width >= 1 and converted.height >= 1
    except Exception:
        return False
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
