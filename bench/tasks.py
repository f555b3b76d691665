"""Benchmark of what a stage's task costs on its process pool, in one run: our runner
(`flows.runners.task_runner(None, workers)`, the stages' default) vs Prefect's own
`ProcessPoolTaskRunner` with as many workers, each mapping the same tasks that do
nothing, timed after a first round that starts the workers. Target: ours <= 1.2x
Prefect's per task (a worker of ours once started a pool of its own around every task:
~2 s a task on 2 cores, against ~0.06 s). Also the CPU seconds the pool's processes
spent by the end of a first round of one task a worker: what starting the pool costs a
stage (Prefect spawns each worker, which imports Prefect afresh; ours are forked from a
forkserver that imported it once). Target: ours <= 0.8x Prefect's on 2 workers (the
server's own import is half what it saves there; with more workers the ratio falls).

    python bench/tasks.py [--tasks 24] [--workers 2] [--repeats 3]   (run by `make bench`)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
from common import print_ms_ratio  # noqa: E402
from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner  # noqa: E402

from flows.runners import task_runner  # noqa: E402
from flows.server import prefect_api  # noqa: E402


@task(cache_policy=NO_CACHE)
def nothing(index: int) -> int:
    return index


def pool_seconds(before: set[int]) -> float:
    """CPU seconds of this process's descendants that were not among `before` (pids)."""
    spent = 0.0
    for child in psutil.Process().children(recursive=True):
        if child.pid not in before:
            with contextlib.suppress(psutil.Error):
                times = child.cpu_times()
                spent += times.user + times.system
    return spent


def seconds_a_task(runner: TaskRunner, workers: int, tasks: int, repeats: int):
    """The best of `repeats` rounds of `tasks` tasks, per task, on one flow's `runner`
    (after a first round of one task a worker, which starts them), and the CPU seconds
    its pool's processes spent by the end of that first round."""
    before = {child.pid for child in psutil.Process().children(recursive=True)}

    @flow(task_runner=runner)
    def rounds() -> tuple[list[float], float]:
        assert [f.result() for f in nothing.map(range(workers))] == list(range(workers))
        started = pool_seconds(before)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            assert [f.result() for f in nothing.map(range(tasks))] == list(range(tasks))
            times.append((time.perf_counter() - start) / tasks)
        return times, started

    times, started = rounds()
    return min(times), started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with prefect_api():
        runs = args.workers, args.tasks, args.repeats
        ours = seconds_a_task(task_runner(None, args.workers), *runs)
        stock = seconds_a_task(ProcessPoolTaskRunner(args.workers), *runs)
    names = "flows.runners", "Prefect's ProcessPoolTaskRunner"
    print(f"a task on {args.workers} pool workers, best of {args.repeats} rounds of {args.tasks}")
    print_ms_ratio((names[0], ours[0]), (names[1], stock[0]), 1.2)
    print(f"CPU seconds of the pool's processes by the end of its first {args.workers} tasks")
    print(f"  ours ({names[0]}) {ours[1]:.2f} s, {names[1]} {stock[1]:.2f} s:")
    ratio = ours[1] / stock[1]
    print(f"  {ratio:.2f}x ({'met' if ratio <= 0.8 else 'MISSED'}: <= 0.8x)")


if __name__ == "__main__":
    main()
