"""How each stage's cost grows with the data: every stage, as DVC runs it (`python -m
flows.<stage>`), at N, 4N and 16N images, with its seconds, the fixed cost and the
marginal cost per image (a least-squares line through the three), the peak anonymous
memory of its main process and of its largest worker (bench/memory.py), and the sizes of
what it writes; then the projection of those figures onto ImageNet.

    make bench
    python bench/scale.py [--images 1000] [--model-images 128] [--repeats 2] [--keep DIR]
        [--only data|model]

The data is the built-in demo's kind (synth), 90% train, 10% val, with small raw files
(sides 160-320) so that it takes minutes. The data stages run at N = --images; training
(one epoch) and the evaluation (10 crops of each val image, and the centre crop of each
train image for the nearest neighbours: its count is crops), ~100x dearer per image on a
CPU, at N = --model-images, on a chain of their own. A stage runs --repeats + 1 times at each size
(stats, train and evaluate one more; prepare reads every raw file four times, stats and
`jpeg` pack every shard: their sizes are 4x the others'), in rounds (N, 4N, 16N, then
again: the VM's slower minutes fall on every size alike); the best time counts:
the fixed cost of a stage (~6 s, Prefect and a process pool starting; ~10 s for train
and evaluate) varies by a few seconds on this VM, as much as the work of a thousand
images (of 10 to evaluate), and the first run of a stage also pays for cold file caches
(torch's libraries). The stages share one Prefect server (started here, so its start-up
is no stage's fixed cost). `compute.window_mb` (per stage) and `pack.batch` are set
small, so that pack's and stats' read-ahead windows are full from the smallest size on:
with the defaults (128 MB, 50 MB chunks) they fill only past ~650 images, and memory
grows until then, by design (a first run with one 40 MB window for all measured stats'
main process 1.19x and `jpeg` pack's 1.16x from N to 16N: their windows were not full
at N).

Targets (issue 15): each stage's peak memory at 16N within 1.2x of its peak at N, and
the marginal cost per image from 4N to 16N within 1.25x of that from N to 4N. The table
gives that ratio from the process's seconds and from its flow's own ("in flow": from
Prefect's "Beginning flow run" line to "Finished in state"), and judges the second: the
process's start (imports, ~4-6 s) is the same at every size, and its noise was as large
as the work N adds to synth or stats (four whole runs missed one stage or another by
it, each a different one).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
from alexnet.shards import CLASSES_FILE, SHARD_PATTERN, shard_files  # noqa: E402
from bench.common import cpu_model  # noqa: E402
from bench.memory import Sampled, run_sampled  # noqa: E402

IMAGENET = {"train": 1_281_167, "val": 50_000}
# Prefect's log lines of a stage's flow run: its first and its last
FLOW_LINE = re.compile(
    r"^(\d\d):(\d\d):(\d\d\.\d+) \| \w+ +\| Flow run '[^']+' - "
    r"(?:Beginning flow run|Finished in state)",
    re.MULTILINE,
)
MEMORY_TARGET = 1.2
LINEAR_TARGET = 1.25
MB = 1 << 20


@dataclass(frozen=True)
class Stage:
    name: str
    args: tuple[str, ...]  # relative to the size's folder
    images: str  # what the cost is per: "all", "train" or "val" images, or "crops"
    writes: tuple[str, ...]  # deleted before each run, as DVC deletes a stage's outs:
    # a second run would otherwise reuse them (prepare's shards, train's checkpoint)
    params: tuple[tuple[str, dict], ...] = ()  # extra overrides of this run
    output: str | None = None  # what it writes, for the sizes
    steadier: int = 0  # more runs at every size, where its work is small beside the noise
    reads: int = 1  # how often it reads each input file (symlinks; see `replicate`)


DATA = (
    Stage("synth", ("raw",), "all", ("raw",), output="raw"),
    # ~1.2 ms an image beside ~5 s fixed: at 1k / 4k / 16k images the work from N to 4N
    # (~3 s) was as large as the fixed cost's noise, and six whole benches measured
    # 0.79x-1.30x (two above the target). Reading every class four times (as four
    # classes: `replicate_raw`) makes its work at N ~5 s and at 16N ~90 s. Its shards are
    # stats' and `jpeg` pack's input.
    Stage(
        "prepare",
        ("raw-x4", "prepared-x4"),
        "all",
        ("prepared-x4",),
        output="prepared-x4",
        reads=4,
    ),
    # ~1 ms an image beside ~7 s fixed: from N to 4N one pass adds ~3 s, about what the
    # fixed cost varies by (four whole benches measured 0.92x, 1.39x, 1.28x and 1.96x,
    # while runs of stats alone at 9/36/144 shards gave 0.79x and 0.87x). Reading every
    # shard four times makes its work at N ~4 s and at 16N ~60 s.
    Stage(
        "stats",
        ("prepared-x4/train", "stats"),
        "train",
        ("stats",),
        (("compute", {"window_mb": 8}),),  # 5 shards' moments (1.5 MB each): N has 36
        steadier=1,
        reads=4,
    ),
    Stage("pack", ("prepared", "lmdb"), "all", ("lmdb",), output="lmdb"),
    # ~1.2 ms an image, most of it Prefect's per task (a task of 64 records each): its
    # cost per image rises over the first ~16k images and then holds (alone, flow seconds
    # at 4k / 16k / 64k images: marginal 1.43, then 1.15 ms an image; at 1k / 4k / 16k
    # five whole benches measured 1.13x-1.86x). So it runs at 4N, 16N and 64N images,
    # every prepared shard read four times, where its steady cost is what is measured.
    Stage(
        "pack",
        ("prepared-x4", "lmdb-jpeg"),
        "all",
        ("lmdb-jpeg",),
        # 1.1 MB chunks: 7 in an 8 MB window (N has 63)
        (("pack", {"encoding": "jpeg"}), ("compute", {"window_mb": 8})),
        output="lmdb-jpeg",
        reads=4,
    ),
)
# At N and 4N, train's and evaluate's work (110 -> 460 and 10 -> 50 images) is a few
# seconds beside a ~10 s start (torch, the model) that varies by 3-4 s from run to run;
# at 16N one run of train varied by 12% (85 and 95 s) from one bench to the next.
MODEL = (
    Stage(
        "train",
        ("lmdb", "stats", "model.pt", "--checkpoint", "ckpt.pt", "--metrics", "metrics"),
        "train",
        ("model.pt", "ckpt.pt", "metrics"),
        steadier=1,
    ),
    # Its work: ten crops of each val image, and one (centre) crop of each train image
    # for the nearest-neighbour search: per crop, so ImageNet's 25.6 train images per val
    # image (9 here) project right.
    Stage(
        "evaluate",
        ("lmdb/val", "model.pt", "--train", "lmdb/train", "--metrics", "metrics"),
        "crops",
        ("metrics/eval.json", "metrics/eval"),
        steadier=1,
    ),
)
STAGES = DATA + MODEL
# The raw `pack`'s input, and train's (not measured: the measured prepare's is 4x)
PREPARED = Stage("prepare", ("raw", "prepared"), "all", ("prepared",))
# What each half runs: the measured stages and the inputs of those that come later
CHAIN = (*DATA[:2], PREPARED, *DATA[2:])


def label(stage: Stage) -> str:
    """The stage and what it stores differently (not its compute settings)."""
    extra = ",".join(
        f"{k}={v}"
        for section, values in stage.params
        if section != "compute"
        for k, v in values.items()
    )
    return f"{stage.name}({extra})" if extra else stage.name


def params_for(images: int, base: dict) -> dict:
    """params.yaml of one size: the repository's, with the bench's overrides."""
    per_class = max(images // 10, 2)
    train = round(per_class * 0.9)
    overrides = {
        "synth": {
            "classes": 10,
            "train_per_class": train,
            "val_per_class": per_class - train,
            "oddities": 0,
            "min_side": 160,
            "max_side": 320,
        },
        "prepare": {"shard_size": 100},
        "pack": {"batch": 64},  # 12 MB chunks: three in the window
        # full batches at every size: a smaller last batch would need less memory
        "train": {"epochs": 1, "batch_size": 16, "val_batch_size": 4, "checkpoint_minutes": 10**6},
        "evaluate": {"batch_size": 4},
        "compute": {"workers": 2, "window_mb": 40},
    }
    return {section: {**base.get(section, {}), **overrides.get(section, {})} for section in base}


def counts(params: dict) -> dict[str, int]:
    synth = params["synth"]
    train = synth["classes"] * synth["train_per_class"]
    val = synth["classes"] * synth["val_per_class"]
    return {"all": train + val, "train": train, "val": val, "crops": evaluated_crops(train, val)}


def evaluated_crops(train: int, val: int) -> int:
    """The crops the evaluate stage runs through the model: 10 per val image (section
    4.1), 1 per train image (the centre crop, for section 6.1's neighbours)."""
    return 10 * val + train


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_stage(stage: Stage, folder: Path, params: dict) -> Sampled:
    for section, values in stage.params:
        params = {**params, section: {**params[section], **values}}
    path = folder / f"params-{label(stage)}.yaml"
    path.write_text(yaml.safe_dump(params))
    if stage.reads > 1:  # "raw-x4" or "prepared-x4[/train]": raw or prepared, 4 times
        many = stage.args[0].split("/")[0]
        kind = many.split("-x")[0]
        (replicate_raw if kind == "raw" else replicate)(folder / kind, folder / many, stage.reads)
    for name in stage.writes:
        target = folder / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    command = [sys.executable, "-m", f"flows.{stage.name}"]
    command += [str(folder / a) if not a.startswith("--") else a for a in stage.args]
    command += ["--params", str(path)]
    result = run_sampled(command, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        sys.exit(f"{label(stage)} failed at {folder.name}:\n{result.output[-3000:]}")
    return result


def replicate(prepared: Path, target: Path, times: int) -> None:
    """`target/{train,val}`: every shard of `prepared` `times` over, as symlinks, and
    `target/classes.json`: a prepared folder with `times` as many images."""
    if target.exists():
        return
    target.mkdir()
    shutil.copy(prepared / CLASSES_FILE, target / CLASSES_FILE)
    for split in ("train", "val"):
        (target / split).mkdir()
        shards = shard_files(prepared / split)
        for copy in range(times):
            for index, shard in enumerate(shards):
                name = SHARD_PATTERN.format(copy * len(shards) + index)
                (target / split / name).symlink_to(shard)


def replicate_raw(raw: Path, target: Path, times: int) -> None:
    """`target`: a raw folder with every class of `raw` `times` over (symlinks to its
    class folders, named apart), and its other files (the class names) once. More
    classes, not larger folders: prepare holds one folder's listing at a time, as it
    would ImageNet's (1,300 images a class at most)."""
    if target.exists():
        return
    target.mkdir()
    for entry in raw.iterdir():
        if entry.is_file():
            (target / entry.name).symlink_to(entry)
    for split in ("train", "val"):
        (target / split).mkdir()
        for folder in sorted((raw / split).iterdir()):
            for copy in range(times):
                (target / split / f"{folder.name}-{copy}").symlink_to(folder)


def flow_seconds(output: str) -> float:
    """The seconds from a stage's "Beginning flow run" line to its "Finished in state":
    its run less the process's start (torch's and Prefect's imports, the API client),
    which cannot depend on the data and varies by seconds from run to run."""
    stamps = [int(h) * 3600 + int(m) * 60 + float(s) for h, m, s in FLOW_LINE.findall(output)]
    return (stamps[-1] - stamps[0]) % 86400 if len(stamps) >= 2 else float("nan")


def fit(images: list[int], seconds: list[float]) -> tuple[float, float]:
    """Fixed seconds and seconds per image of the least-squares line."""
    slope, intercept = np.polyfit(images, seconds, 1)
    return float(intercept), float(slope)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="N of the data stages")
    parser.add_argument("--model-images", type=int, default=128, help="N of train, evaluate")
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="runs of a stage at each size, besides one for cold caches (and a stage's extra)",
    )
    parser.add_argument("--keep", type=Path, help="keep the data in this folder")
    parser.add_argument("--only", choices=("data", "model"), help="one half of the table")
    args = parser.parse_args()
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    halves = []  # (name, N, the chain to run, the stages measured)
    if args.only != "model":
        halves.append(("data", args.images, CHAIN, DATA))
    if args.only != "data":
        halves.append(("model", args.model_images, CHAIN + MODEL, MODEL))

    # as flows/server.py does for a stage's own server: its telemetry heartbeat, with no
    # network to reach, only prints tracebacks
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    root = Path(args.keep or tempfile.mkdtemp(prefix="alexnet-scale-"))
    results: dict[str, list[Sampled]] = {label(s): [] for s in STAGES}
    in_flow: dict[str, list[float]] = {label(s): [] for s in STAGES}  # best flow_seconds
    images: dict[str, list[int]] = {label(s): [] for s in STAGES}
    stored: dict[str, list[int]] = {s.output: [] for s in DATA if s.output}
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; data in {root}", flush=True)
    try:
        with prefect_test_harness(server_startup_timeout=120):
            from prefect.settings import PREFECT_API_URL

            os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()
            for half, n, chain, measured in halves:
                sizes = [root / f"{half}{n * k}" for k in (1, 4, 16)]
                params = [params_for(n * k, base) for k in (1, 4, 16)]
                for folder, values in zip(sizes, params, strict=True):
                    shutil.rmtree(folder, ignore_errors=True)
                    folder.mkdir(parents=True)
                    values["prepare"]["raw"] = str(folder / "raw")
                for stage in chain:
                    if stage not in measured:  # the inputs of train and evaluate
                        for folder, values in zip(sizes, params, strict=True):
                            run_stage(stage, folder, values)
                        continue
                    runs = rounds(stage, sizes, params, args.repeats)
                    for folder, values, sampled in zip(sizes, params, runs, strict=True):
                        best = min(sampled, key=lambda r: r.seconds)
                        main_peak = max(r.main_peak for r in sampled)
                        worker_peak = max(r.worker_peak for r in sampled)
                        results[label(stage)].append(
                            Sampled(best.seconds, main_peak, worker_peak, 0, "")
                        )
                        images[label(stage)].append(counts(values)[stage.images] * stage.reads)
                        in_flow[label(stage)].append(min(flow_seconds(r.output) for r in sampled))
                        print(f"  {folder.name} {label(stage)}: {best.seconds:.1f} s", flush=True)
                if half == "data":
                    for output in stored:
                        stored[output] += [folder_bytes(folder / output) for folder in sizes]
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report(results, in_flow, images, stored)


def rounds(stage: Stage, sizes: list[Path], params: list[dict], repeats: int) -> list[list]:
    """The runs of a stage at N, 4N and 16N, taken in rounds (N, 4N, 16N, then again), so
    that a slower minute of the VM falls on every size alike: at every size `repeats`,
    one more (the first run pays for cold caches) and `stage.steadier` more. As many at
    each size: the best of more runs is lower, which would tilt the ratio of sizes."""
    wanted = [repeats + 1 + stage.steadier] * len(sizes)
    runs: list[list] = [[] for _ in sizes]
    for turn in range(max(wanted)):
        for index, (folder, values) in enumerate(zip(sizes, params, strict=True)):
            if turn < wanted[index]:
                runs[index].append(run_stage(stage, folder, values))
    return runs


def marginal_ratio(n: list[int], seconds: list[float]) -> float:
    """Seconds per image from 4N to 16N over seconds per image from N to 4N."""
    low = (seconds[1] - seconds[0]) / (n[1] - n[0])
    high = (seconds[2] - seconds[1]) / (n[2] - n[1])
    return high / low if low > 0 else float("inf")


def report(results, in_flow, images, stored) -> None:
    """The table. The linearity target is judged on the flow's own seconds (`flow_seconds`):
    the process's start is the same work at every size, but its few seconds of noise
    are as large as the work N adds to some stages. Both ratios are printed."""
    print(
        f"\n{'stage':<22}{'images':>16}{'seconds':>20}{'fixed s':>9}{'ms/img':>8}"
        f"{'marginal 16N/4N':>17}{'in flow':>9}{'main MB':>16}{'worker MB':>16}"
        f"{'memory 16N/N':>14}"
    )
    fitted = {}
    met = True
    for name, runs in results.items():
        if not runs:
            continue
        n = images[name]
        seconds = [r.seconds for r in runs]
        fixed, per_image = fit(n, seconds)
        fitted[name] = (fixed, per_image, runs[-1])
        linear = marginal_ratio(n, seconds)
        flow_linear = marginal_ratio(n, in_flow[name])
        memory = max(
            runs[-1].main_peak / runs[0].main_peak,
            runs[-1].worker_peak / max(runs[0].worker_peak, 1) if runs[0].worker_peak else 1.0,
        )
        ok = flow_linear <= LINEAR_TARGET and memory <= MEMORY_TARGET
        met &= ok
        print(
            f"{name:<22}{'/'.join(map(str, n)):>16}{'/'.join(f'{s:.1f}' for s in seconds):>20}"
            f"{fixed:>9.1f}{per_image * 1000:>8.2f}{linear:>16.2f}x{flow_linear:>8.2f}x"
            f"{'/'.join(str(r.main_peak // MB) for r in runs):>16}"
            f"{'/'.join(str(r.worker_peak // MB) for r in runs):>16}{memory:>13.2f}x"
            f"{'' if ok else '  (target missed)'}"
        )
    print(
        f"targets: memory at 16N <= {MEMORY_TARGET}x N (main and largest worker), "
        f"marginal cost 16N/4N in the flow <= {LINEAR_TARGET}x: "
        f"{'all met' if met else 'NOT all met'}"
    )
    print("\nstored (MB at the stage's three sizes, and per image):")
    per_image_bytes = {}
    writers = {stage.output: label(stage) for stage in DATA if stage.output}
    for output, sizes_ in stored.items():
        if not sizes_:
            continue
        counted = images[writers[output]]  # the images of the stage that wrote it
        per = (sizes_[-1] - sizes_[0]) / (counted[-1] - counted[0])
        per_image_bytes[output] = per
        print(f"  {output:<10}{'/'.join(str(s // MB) for s in sizes_):>20}{per / 1024:>10.1f} KB")
    project(fitted, per_image_bytes)


def project(fitted, per_image_bytes) -> None:
    """ImageNet from the fitted costs: hours on this machine, and per 16 cores where the
    stage's work is spread over worker processes (all but train and evaluate, whose
    ImageNet runs are on GPUs: BENCHMARKS.md's GPU section)."""
    cores = os.cpu_count() or 1
    total = IMAGENET["train"] + IMAGENET["val"]
    which = {
        "all": total,
        "train": IMAGENET["train"],
        "val": IMAGENET["val"],
        "crops": evaluated_crops(IMAGENET["train"], IMAGENET["val"]),
    }
    print(f"\nImageNet ({IMAGENET['train']:,} train + {IMAGENET['val']:,} val images), projected:")
    print(f"{'stage':<22}{'hours here':>12}{'hours, 16 cores':>17}{'peak MB':>10}{'disk GB':>10}")
    for stage in STAGES[1:]:  # not synth: ImageNet is not generated
        name = label(stage)
        if name not in fitted:
            continue
        fixed, per_image, last = fitted[name]
        n = which[stage.images]
        here = (fixed + per_image * n) / 3600
        parallel = stage.name not in ("train", "evaluate")
        sixteen = (
            f"{(fixed + per_image * n * cores / 16) / 3600:>17.2f}"
            if parallel
            else (f"{'(GPU)':>17}")
        )
        disk = per_image_bytes.get(stage.output)
        disk_text = f"{disk * total / 1e9:>10.1f}" if disk else f"{'':>10}"
        peak = max(last.main_peak, last.worker_peak) // MB
        print(f"{name:<22}{here:>12.2f}{sixteen}{peak:>10}{disk_text}")


if __name__ == "__main__":
    main()
