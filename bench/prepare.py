"""Benchmark of the prepare stage's per-image work, in one run, one core each:
ours (pillow-simd + draft + crop-region resize) vs a plain stock-Pillow baseline (run in a
side environment that `make bench` creates) vs decode-only, on photo-like JPEGs of
ImageNet size (~500x375) and large ones (~2000x1500); and what making a shard in the
decoder's child process (as the stage runs it) costs over making it in-process.

    make bench
    python bench/prepare.py --baseline-python .venv-bench-pillow/bin/python

Every mode runs in a fresh single-threaded subprocess under the same environment
(including the glibc malloc settings), best of `--repeats` passes. The ways of one
worker take turns in each pass; the isolation's cost is the median over passes of
isolated/in-process, each pair timed back to back (on a VM whose speed drifts by 20%
within a minute, a pair shares the drift; two bests need not).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import cpu_model, photo_like  # noqa: E402

HERE = Path(__file__).resolve().parent
WORKER = HERE / "prepare_worker.py"
# Same allocator behaviour for every process: otherwise glibc maps and unmaps every
# buffer >= 128 KB, which moves Pillow 15-45%.
ENV = {
    **os.environ,
    "MALLOC_MMAP_THRESHOLD_": "67108864",
    "MALLOC_TRIM_THRESHOLD_": "268435456",
    "OMP_NUM_THREADS": "1",
}


def make_set(folder: Path, count: int, size: tuple[int, int]) -> float:
    folder.mkdir(parents=True)
    total = 0
    for i in range(count):
        jitter = 1 + 0.1 * ((i % 5) - 2) / 2
        data = photo_like(int(size[0] * jitter), int(size[1] * jitter), i)
        (folder / f"{i:04d}.jpg").write_bytes(data)
        total += len(data)
    return total / count / 1024


def timed(python: str, mode: str, folder: Path, repeats: int) -> dict:
    command = ["taskset", "-c", "0", python, str(WORKER), mode, str(folder), str(repeats)]
    if not Path("/usr/bin/taskset").exists():
        command = command[3:]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-python", required=True, help="python of the stock-Pillow env")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--large", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    cpu = cpu_model()
    print(f"CPU: {cpu}; one core per measurement; best of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        sets = {
            "ImageNet-sized ~500x375": (Path(tmp) / "normal", args.images, (500, 375)),
            "large ~2000x1500": (Path(tmp) / "large", args.large, (2000, 1500)),
        }
        header = (
            f"{'images':<26}{'KB':>6}{'stock Pillow':>14}{'ours':>8}{'decode':>8}"
            f"{'ours/Pillow':>13}{'ours time/decode':>18}{'shard':>8}{'isolated':>10}"
            f"{'isolation':>11}"
        )
        print(header)
        for label, (folder, count, size) in sets.items():
            kb = make_set(folder, count, size)
            rate, result_of = {}, {}
            versions = {}
            for python, mode in (
                (args.baseline_python, "pillow"),
                (sys.executable, "ours"),  # and "isolated", in turns with it
                (sys.executable, "decode"),
            ):
                result = timed(python, mode, folder, args.repeats)
                result_of.update(result["seconds"])
                for name, seconds in result["seconds"].items():
                    rate[name] = result["images"] / min(seconds)
                    versions[name] = result["pil"]
            pairs = zip(result_of["isolated"], result_of["shard"], strict=True)
            cost = statistics.median(isolated / inside for isolated, inside in pairs) - 1
            print(
                f"{label:<26}{kb:>6.0f}{rate['pillow']:>14.0f}{rate['ours']:>8.0f}"
                f"{rate['decode']:>8.0f}{rate['ours'] / rate['pillow']:>12.2f}x"
                f"{rate['decode'] / rate['ours']:>17.2f}x{rate['shard']:>8.0f}"
                f"{rate['isolated']:>10.0f}{cost:>+10.1%}"
            )
        print(
            f"(images/s per core; stock Pillow {versions['pillow']}, ours PIL {versions['ours']};"
            " shard: the stage's work on the files (read, fingerprint, prepare, write the tar)"
            " in-process; isolated: the same in the decoder process, as the stage runs it;"
            " isolation: the time that adds, median of paired passes)"
        )


if __name__ == "__main__":
    main()
