"""Shared fixtures: images made by the tests themselves, and one Prefect test server."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth, photo-like RGB image (JPEG-friendly, with structure to resample)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(x * rng.uniform(3, 12) + y * rng.uniform(3, 12) + rng.uniform(0, 6))
                for _ in range(3)]  # fmt: skip
    pixels = (np.stack(channels, -1) * 110 + 128).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    return encode(photo(width, height, seed), "JPEG", quality=quality)


def make_imagefolder(root: Path, classes: int = 3, train: int = 4, val: int = 2) -> Path:
    """A small raw dataset in ImageFolder layout with a synset mapping file."""
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"n0000000{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                seed = c * 100 + i + (50 if split == "val" else 0)
                (folder / f"n0000000{c}_{i}.JPEG").write_bytes(
                    jpeg(300 + 17 * i, 260 + 9 * c, seed)
                )
    names = "".join(f"n0000000{c} class {c}, thing\n" for c in range(classes))
    (root / "LOC_synset_mapping.txt").write_text(names)
    return root


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server for the whole session (building its database costs ~15 s).
    Worker processes inherit its URL through the environment."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value()
        previous = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
        try:
            yield url
        finally:
            if previous is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = previous
