"""The codecs a photo folder needs from PIL, and what to install for a missing one (a
module of its own: the prepare stage names them in skip reasons without importing the
rest of `alexnet.doctor`)."""

from __future__ import annotations

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
