"""The built-in demo dataset: procedurally drawn objects in the ImageFolder layout.

Each class is one shape filled with one texture, in random colours (so colour alone says
nothing), on a cluttered gradient background, at a random position, size and rotation;
images are 160-1000 px a side with aspect 1:2 to 2:1, like ImageNet photos. Every image
is drawn from its own seeded generator, so the bytes depend only on the seed and the
image's place, not on the order or the process that draws it. The training split also
carries a few files of each oddity real ImageNet has (CMYK, greyscale, a PNG named
.JPEG) and of the broken files real crawls have (truncated, empty, not an image).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from alexnet.atomic import folder_target
from alexnet.params import DEFAULTS

SHAPES = [
    "disc",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "hexagon",
    "crescent",
    "arrow",
    "heart",
]
TEXTURES = [
    "plain",
    "striped",
    "checked",
    "dotted",
    "gridded",
    "wavy",
    "banded",
    "speckled",
    "zigzag",
    "shaded",
]
ODDITIES = ["cmyk", "grey", "png", "truncated", "empty", "notimage"]
SPLIT_CODES = {"train": 0, "val": 1}
SYNTH_OWNER = "synth"  # the stage named in its folder's mark (alexnet.atomic.OWNED)


@dataclass(frozen=True)
class SynthClass:
    index: int
    wnid: str
    name: str


@dataclass(frozen=True)
class Job:
    """Images `start .. start+count-1` of one split, numbered class after class
    (`per_class` each): a unit of parallel work, which may span classes."""

    split: str
    per_class: int
    start: int
    count: int

    def images(self) -> list[tuple[int, int]]:
        """(label, number within the class) of each of the job's images."""
        return [divmod(k, self.per_class) for k in range(self.start, self.start + self.count)]


def synth_classes(count: int) -> list[SynthClass]:
    # wnid-like ids (n9...) that sort in class order and cannot clash with real WordNet ids.
    return [
        SynthClass(k, f"n{90000000 + k:08d}", f"{TEXTURES[k]} {SHAPES[k]}") for k in range(count)
    ]


def _polygon(shape: str, n: int = 96) -> list[np.ndarray]:
    """Outline(s) of a shape in unit coordinates (radius ~1); later outlines are holes."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    circle = np.stack([np.cos(t), np.sin(t)], 1)

    def regular(k: int, r: float = 1.0, phase: float = 0.0) -> np.ndarray:
        a = phase + np.arange(k) * 2 * np.pi / k
        return r * np.stack([np.cos(a), np.sin(a)], 1)

    if shape == "disc":
        return [circle]
    if shape == "square":
        return [regular(4, 1.0, np.pi / 4)]
    if shape == "triangle":
        return [regular(3, 1.1, -np.pi / 2)]
    if shape == "hexagon":
        return [regular(6)]
    if shape == "star":
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return [regular(10) * radii[:, None]]
    if shape == "cross":
        a, b = 0.33, 1.0
        return [
            np.array(
                [
                    [-a, -b],
                    [a, -b],
                    [a, -a],
                    [b, -a],
                    [b, a],
                    [a, a],
                    [a, b],
                    [-a, b],
                    [-a, a],
                    [-b, a],
                    [-b, -a],
                    [-a, -a],
                ]
            )
        ]
    if shape == "ring":
        return [circle, circle * 0.55]
    if shape == "crescent":
        return [circle, circle * 0.85 + [0.45, 0.0]]
    if shape == "arrow":
        return [
            np.array(
                [[-1, -0.3], [0.2, -0.3], [0.2, -0.75], [1, 0], [0.2, 0.75], [0.2, 0.3], [-1, 0.3]]
            )
        ]
    if shape == "heart":
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [np.stack([x, y], 1) / 16]
    raise ValueError(f"unknown shape {shape}")


def _texture(kind: str, u: np.ndarray, v: np.ndarray, period: float, rng) -> np.ndarray:
    """A 0/1 (or 0..1) pattern over rotated coordinates u, v (pixels)."""
    pu, pv = u / period, v / period
    if kind == "plain":
        return np.zeros_like(u)
    if kind == "striped":
        return np.floor(pu) % 2
    if kind == "checked":
        return (np.floor(pu) + np.floor(pv)) % 2
    if kind == "dotted":
        return (((pu % 1) - 0.5) ** 2 + ((pv % 1) - 0.5) ** 2 < 0.09).astype(float)
    if kind == "gridded":
        return ((pu % 1 < 0.22) | (pv % 1 < 0.22)).astype(float)
    if kind == "wavy":
        return (np.sin(2 * np.pi * pu + 2.5 * np.sin(2 * np.pi * pv / 2)) > 0).astype(float)
    if kind == "banded":
        return np.floor(np.hypot(pu, pv) * 1.5) % 2
    if kind == "speckled":
        cells = rng.random((64, 64)) < 0.5
        return cells[(np.floor(pu * 2).astype(int) % 64), (np.floor(pv * 2).astype(int) % 64)]
    if kind == "zigzag":
        return np.floor(pu + np.abs((pv % 2) - 1)) % 2
    if kind == "shaded":
        return np.clip((u - u.min()) / max(np.ptp(u), 1.0), 0, 1)
    raise ValueError(f"unknown texture {kind}")


def _colours(rng) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours far enough apart for the texture to show."""
    while True:
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if np.abs(a - b).sum() > 180:
            return a.astype(float), b.astype(float)


def _background(width: int, height: int, rng, clutter: int) -> Image.Image:
    """A colour gradient with clutter: clutter/2 to clutter small lines, boxes and blobs in
    random colours."""
    c1, c2 = _colours(rng)
    vertical = rng.random() < 0.5
    ramp = np.linspace(0, 1, height if vertical else width)[:, None]
    line = (c1 * (1 - ramp) + c2 * ramp).astype(np.uint8)  # (L, 3)
    pixels = line[:, None, :] if vertical else line[None, :, :]
    image = Image.fromarray(np.ascontiguousarray(np.broadcast_to(pixels, (height, width, 3))))
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    for _ in range(int(rng.integers(clutter // 2, clutter + 1))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = rng.random(2) * [width, height]
        s = side * rng.uniform(0.02, 0.09)
        kind = rng.integers(3)
        if kind == 0:
            dx, dy = rng.normal(0, side * 0.15, 2)
            draw.line([x, y, x + dx, y + dy], fill=colour, width=max(1, int(s / 4)))
        elif kind == 1:
            draw.rectangle([x, y, x + s, y + s * rng.uniform(0.5, 2)], fill=colour)
        else:
            draw.ellipse([x, y, x + s, y + s * rng.uniform(0.5, 2)], fill=colour)
    return image


def render(
    label: int,
    rng,
    min_side: int = DEFAULTS.synth.min_side,
    max_side: int = DEFAULTS.synth.max_side,
    clutter: int = DEFAULTS.synth.clutter,
) -> Image.Image:
    """One RGB image of class `label`."""
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))  # width / height
    width = int(rng.integers(min_side, max_side + 1))
    height = int(np.clip(round(width / aspect), min_side, max_side))
    image = _background(width, height, rng, clutter)
    side = min(width, height)
    radius = side * rng.uniform(0.22, 0.4)
    centre = np.array([width, height]) / 2 + rng.uniform(-0.12, 0.12, 2) * side
    angle = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])

    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    for number, outline in enumerate(_polygon(SHAPES[label])):
        points = outline @ rotation.T * radius + centre
        draw.polygon([tuple(p) for p in points], fill=0 if number else 255)

    # The texture is only computed in the object's bounding box (the rest is masked away).
    left, top = np.maximum(np.floor(centre - 1.25 * radius), 0).astype(int)
    right, bottom = np.minimum(np.ceil(centre + 1.25 * radius), [width, height]).astype(int)
    y, x = np.mgrid[top:bottom, left:right].astype(np.float32)
    x, y = x - centre[0], y - centre[1]
    theta = rng.uniform(0, np.pi)
    u = x * np.cos(theta) + y * np.sin(theta)
    v = -x * np.sin(theta) + y * np.cos(theta)
    pattern = _texture(TEXTURES[label], u, v, radius / rng.uniform(2.5, 5.0), rng)[..., None]
    a, b = _colours(rng)
    fill = Image.fromarray((a * (1 - pattern) + b * pattern).astype(np.uint8), "RGB")
    box = (left, top, right, bottom)
    soft = mask.crop(box).filter(ImageFilter.GaussianBlur(1))
    image.paste(Image.composite(fill, image.crop(box), soft), box)
    # Sensor-like noise from a random 128x128 tile (drawing a full-size field is the slow part).
    tile = (rng.standard_normal((128, 128, 1), dtype=np.float32) * 6).astype(np.int16)
    noise = np.tile(tile, (height // 128 + 1, width // 128 + 1, 1))[:height, :width]
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def image_rng(seed: int, split: str, label: int, number: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_CODES[split], label, number])


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def oddity_bytes(kind: str, image: Image.Image, quality: int) -> bytes:
    """The bytes of one odd file made from a normal image."""
    if kind == "cmyk":
        return _jpeg(image.convert("CMYK"), quality)
    if kind == "grey":
        return _jpeg(image.convert("L"), quality)
    if kind == "png":
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    if kind == "truncated":
        data = _jpeg(image, quality)
        return data[: len(data) // 2]
    if kind == "empty":
        return b""
    if kind == "notimage":
        return b"<html><body>This photo is no longer available</body></html>\n"
    raise ValueError(f"unknown oddity {kind}")


# Images per task: a process pool's task costs ~0.2 s of a worker's CPU in Prefect
# itself, and 25 demo images (~0.2 s) per task made synth 2x slower than its drawing.
CHUNK = 100


def plan_jobs(
    classes: int, train_per_class: int, val_per_class: int, chunk: int = CHUNK
) -> list[Job]:
    jobs = []
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        total = classes * per_class
        for start in range(0, total, chunk):
            jobs.append(Job(split, per_class, start, min(chunk, total - start)))
    return jobs


def run_job(
    job: Job, root: Path, seed: int, min_side: int, max_side: int, quality: int, clutter: int
) -> int:
    """Draw and write the job's images into the folder `root` the stage made; returns
    how many files it wrote."""
    images = job.images()
    classes = synth_classes(images[-1][0] + 1) if images else []
    for label, number in images:
        wnid = classes[label].wnid
        folder = Path(root) / job.split / wnid
        # Not `root` itself (FileNotFoundError where it is gone): a task that starts after
        # a stopped stage removed its temporary folder would make it again, left behind.
        folder.parent.mkdir(exist_ok=True)
        folder.mkdir(exist_ok=True)
        image = render(
            label, image_rng(seed, job.split, label, number), min_side, max_side, clutter
        )
        (folder / f"{wnid}_{number:05d}.JPEG").write_bytes(_jpeg(image, quality))
    return job.count


def write_oddities(root: Path, classes: int, per_kind: int, seed: int, quality: int) -> int:
    """`per_kind` files of each oddity, spread over the training classes."""
    written = 0
    for k, kind in enumerate(ODDITIES):
        for j in range(per_kind):
            label = (k * per_kind + j) % classes
            wnid = synth_classes(label + 1)[label].wnid
            rng = np.random.default_rng([seed, 9, k, j])
            data = oddity_bytes(kind, render(label, rng, 160, 400), quality)
            path = Path(root) / "train" / wnid / f"{wnid}_odd_{kind}_{j}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            written += 1
    return written


def write_mapping(root: Path, classes: int) -> None:
    """`LOC_synset_mapping.txt`, ImageNet's format: `wnid name` per line."""
    lines = [f"{c.wnid} {c.name}\n" for c in synth_classes(classes)]
    (Path(root) / "LOC_synset_mapping.txt").write_text("".join(lines))


def refuse(out: str, **_: object) -> None:
    """What stops the stage before any work, as one line (`flows.stages.Stage.refusal`)."""
    folder_target(out, SYNTH_OWNER)
