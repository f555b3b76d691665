"""The codecs a photo folder needs from PIL, and what to install for a missing one (a
module of its own: the prepare stage names them in skip reasons without importing the
rest of `alexnet.doctor`)."""

from __future__ import annotations

import warnings

# What the live PIL can decode, by the names PIL.features gives them, with the
# Debian/Ubuntu package whose headers pillow-simd's build needs for each (scripts/setup.sh
# checks the same headers before it builds, and warns about the missing ones).
CODECS: dict[str, tuple[str, str]] = {
    "jpg": ("codec", "libjpeg-dev"),
    "zlib": ("codec", "zlib1g-dev"),
    "libtiff": ("codec", "libtiff-dev"),
    "webp": ("codec", "libwebp-dev"),
    "jpg_2000": ("codec", "libopenjp2-7-dev"),
    "avif": ("codec", "libavif-dev (1.0 or later)"),
    "littlecms2": ("module", "liblcms2-dev"),
    "freetype2": ("module", "libfreetype-dev"),
    "libjpeg_turbo": ("feature", "libjpeg62-turbo-dev (Ubuntu: libjpeg-turbo8-dev)"),
}


def missing_codec_hint(name: str) -> str:
    """A skip reason's words for a codec (a PIL.features name) this PIL lacks."""
    package = CODECS.get(name, ("", ""))[1]
    install = f"install {package} and re-run make setup; " if package else ""
    return f"{name} (not in this PIL: {install}`alexnet doctor` lists codecs)"


# The codecs that decide what prepare decodes, less freetype2, which draws text (no stage
# does), and libjpeg_turbo, told by its version below.
DECODING = tuple(name for name in CODECS if name not in ("freetype2", "libjpeg_turbo"))
HAS, LACKS = "yes", "no"


def pil_build() -> dict[str, str]:
    """What a PIL of one version may be built with or without (pillow-simd is built on
    each machine): one without a codec skips the files another decodes, and another
    libjpeg build decodes and encodes other bytes. A Dask worker must match its stage
    (`alexnet.cluster`), and a prepared shard is current only for the build it was
    made with (`alexnet.prepare.fingerprint`)."""
    from PIL import features

    with warnings.catch_warnings():  # an older PIL warns of a codec it does not know
        warnings.simplefilter("ignore")
        built = {f"PIL {name}": HAS if features.check(name) else LACKS for name in DECODING}
    # "jpg" gives the libjpeg API's version (6.2, 8.0, 9e); the turbo build's own
    # (its SIMD code) is a version of its own, "none" for a plain libjpeg.
    jpeg = {"libjpeg": features.version("jpg"), "libjpeg-turbo": features.version("libjpeg_turbo")}
    return {**built, **{name: version or "none" for name, version in jpeg.items()}}
