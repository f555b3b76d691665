"""Helpers the tests share: images and datasets made by the tests themselves, a copy of
the repository as a fresh git + DVC project, a tiny LMDB training set."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import numpy as np
from PIL import Image

from alexnet.params import PrepareParams, SynthParams, TrainParams

REPO = Path(__file__).resolve().parents[1]
# A PID no process has: Linux gives PIDs below pid_max. A temporary named with it is
# what a run killed long ago left.
DEAD_PID = int(Path("/proc/sys/kernel/pid_max").read_text())


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth, photo-like RGB image (JPEG-friendly, with structure to resample)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [
        np.sin(x * rng.uniform(3, 12) + y * rng.uniform(3, 12) + rng.uniform(0, 6))
        for _ in range(3)
    ]
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


# The tests' net: the paper's layers at an eighth of their kernels and units (params
# `model.width`). What the tests of training, resuming, placing and the chain hold does
# not need the paper's width, which cost about half of their CPU (fc6 alone is 151 MB a
# checkpoint, and every step's memory was fresh pages); tests of the paper's net itself
# (tests/test_model.py) make it at its width.
TEST_MODEL = {"init": "caffe", "width": 0.125}

TINY_CHAIN = {
    "synth": {
        "classes": 2,
        "train_per_class": 4,
        "val_per_class": 2,
        "min_side": 64,
        "max_side": 160,
        "oddities": 0,
    },
    # Not the default 256: the chain must carry `prepare.size` through every stage.
    "prepare": {"shard_size": 4, "size": 240},
    "train": {
        "epochs": 1,
        "batch_size": 4,
        "val_batch_size": 4,
        "lighting": 0.0,
    },
    "model": TEST_MODEL,
    "evaluate": {"batch_size": 4},
    "compute": {"workers": 1},
}


def repo_copy(root: Path, params: dict) -> Path:
    """The repository's tracked files (working-tree versions) in a fresh git + DVC
    repository at `root`, its params.yaml overridden by `params` (section by section)."""
    import shutil
    import subprocess

    import yaml

    files = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    skip = ("dvc.lock", "metrics/")
    for name in files:
        if name.startswith(skip) or not (REPO / name).exists():
            continue
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    # DVC needs every section a stage lists: the repo's params.yaml, `params` merged in.
    merged = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in params.items():
        merged[section] = {**merged.get(section, {}), **values}
    (root / "params.yaml").write_text(yaml.safe_dump(merged))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    # A first commit, as in any clone (dvclive refuses a git repository without one).
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm", "copy"],
        cwd=root,
        check=True,
    )
    return root


CLASSES = [{"index": i, "wnid": f"n{i}", "name": f"c{i}"} for i in range(2)]


def blobs(label: int, count: int, seed: int) -> list[tuple[int, bytes]]:
    """256x256 images: class 0 dark with a bright square, class 1 bright with stripes."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(count):
        image = rng.integers(0, 40, (256, 256, 3)).astype(np.uint8)
        if label == 0:
            image[80:180, 80:180] = 220
        else:
            image[:, ::16] = 250
        records.append((label, image.tobytes()))
    return records


def tiny_training_data(root: Path) -> Path:
    """Train (10 images) and val (4) LMDB stores of `blobs`, and their stats, in `root`."""

    from alexnet.lmdb_store import write_store
    from alexnet.stats import save_stats

    train = blobs(0, 5, 1) + blobs(1, 5, 2)
    val = blobs(0, 2, 3) + blobs(1, 2, 4)
    write_store(root / "lmdb" / "train", [train[::2], train[1::2]], "raw", CLASSES, size=256)
    write_store(root / "lmdb" / "val", [val], "raw", CLASSES, size=256)
    eig = {"eigenvalues": [900.0, 90.0, 9.0], "eigenvectors": np.eye(3).tolist()}
    save_stats(root / "stats", np.full((256, 256, 3), 60, np.float32), eig)
    return root


def jpeg_training_data(root: Path, count: int = 8) -> Path:
    """Train and val `jpeg` stores of the same `count` photo-like 256x256 images (2
    classes), and their stats, in `root`: what a JPEG-decoding training path reads."""
    from alexnet.lmdb_store import write_store
    from alexnet.stats import save_stats

    records = [(i % 2, encode(photo(256, 256, seed=i), "JPEG", quality=90)) for i in range(count)]
    for split in ("train", "val"):
        write_store(root / "lmdb" / split, [records], "jpeg", CLASSES, size=256)
    eig = {"eigenvalues": [900.0, 90.0, 9.0], "eigenvectors": np.eye(3).tolist()}
    save_stats(root / "stats", np.full((256, 256, 3), 100, np.float32), eig)
    return root


# A checkpoint at every step: one falls due at a loss read, so a read at every step too.
EVERY_STEP = {"checkpoint_minutes": 0, "sync_every": 1}
# The params' own cadence: on a test's scale, a checkpoint at each epoch's end only.
EPOCH_ENDS = {key: TrainParams.model_fields[key].default for key in EVERY_STEP}


def train_run(data: Path, folder: Path, model: dict | None = None, **train):
    """A `TrainRun` on `tiny_training_data(data)` writing into `folder`: batch 4, a
    checkpoint every step, the tests' net (`TEST_MODEL`) with dropout 0.5 unless `model`
    says otherwise."""
    from alexnet.params import ComputeParams, ModelParams
    from alexnet.train import TrainRun

    train = {"batch_size": 4, "val_batch_size": 4, **EVERY_STEP, **train}
    return TrainRun(
        train=TrainParams(**train),
        model=ModelParams(**{**TEST_MODEL, "dropout": 0.5, **(model or {})}),
        image=PrepareParams().image_options(),
        kernels=ComputeParams().kernels,
        lmdb=data / "lmdb",
        stats=data / "stats",
        model_path=folder / "alexnet.pt",
        checkpoint=folder / "ckpt.pt",
        metrics=folder / "metrics",
    )


def within(got, expected, rtol: float) -> bool:
    """|got - expected| <= rtol * max|expected| everywhere (tensors of any device and
    float dtype, compared in float64 on the CPU): a tolerance relative to the largest
    value, as float rounding errors of sums and products scale with it."""
    got, expected = got.detach().cpu().double(), expected.detach().cpu().double()
    assert got.shape == expected.shape, (got.shape, expected.shape)
    return bool((got - expected).abs().max() <= rtol * expected.abs().max())


def assert_updates_within(got: dict, expected: dict, start: dict, rtol: float) -> None:
    """Two runs from the same weights `start` made the same updates (weights less the
    initial ones) within `rtol` of the largest (`within`), tensor by tensor."""
    for name, value in expected.items():
        assert within(got[name] - start[name], value - start[name], rtol), name


def in_fresh_process(function, *args):
    """`function(*args)` in a spawned process of its own, for a measure of the whole
    process (tracemalloc counts every thread's allocations: an earlier test's background
    threads in this worker would be counted too). `function` must be importable."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result(timeout=300)


def run_python(code: str, env: dict | None = None, blocked: tuple[str, ...] = ()):
    """`python -c code` in a fresh process at the repository's root, the packages named in
    `blocked` unimportable there (an import of one raises ImportError); returns the
    completed process (the test asserts on its status and output)."""
    import subprocess
    import sys

    block = "".join(f"import sys; sys.modules[{name!r}] = None\n" for name in blocked)
    return subprocess.run(
        [sys.executable, "-c", block + code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


# The demo dataset of the flow tests (the `raw` and `reference` fixtures, conftest.py).
TINY = SynthParams(classes=3, train_per_class=6, val_per_class=2, max_side=400, oddities=1)
SHARDS = PrepareParams(shard_size=4, max_skipped=0.2)  # 3 of 30 demo files are broken


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.tar"))}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_writes_what_dvc_tracks(stage: str, root: Path, folders: tuple[str, ...]) -> None:
    """The files a stage wrote under `root`/`folders` (its defaults' layout) are exactly
    what dvc.yaml tracks for it (outs, metrics, plots; a tracked folder holds any): a file
    renamed in the code, or one added, fails here rather than going unversioned."""
    import yaml

    entry = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    tracked = [
        next(iter(out)) if isinstance(out, dict) else out
        for key in ("outs", "metrics", "plots")
        for out in entry.get(key, ())
    ]
    for path in tracked:
        assert (root / path).exists(), f"dvc.yaml tracks {path}, which {stage} did not write"
    written = [
        path.relative_to(root).as_posix()
        for folder in folders
        for path in (root / folder).rglob("*")
        if path.is_file() and not path.name.startswith(".")  # our marks (alexnet.atomic)
    ]
    for path in written:
        inside = any(path == t or path.startswith(f"{t}/") for t in tracked)
        assert inside, f"{stage} wrote {path}, which dvc.yaml does not track"
