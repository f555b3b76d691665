"""Benchmark of what a stage's task costs on its process pool, in one run: our runner
(`flows.runners.task_runner(None, workers)`, the stages' default) vs Prefect's own
`ProcessPoolTaskRunner` with as many workers, each mapping the same tasks that do
nothing, timed after a first round that starts the workers. Target: ours <= 1.2x
Prefect's per task (a worker of ours once started a pool of its own around every task:
~2 s a task on 2 cores, against ~0.06 s).

    python bench/tasks.py [--tasks 24] [--workers 2] [--repeats 3]   (run by `make bench`)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import print_ms_ratio  # noqa: E402
from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner  # noqa: E402

from flows.runners import task_runner  # noqa: E402
from flows.server import prefect_api  # noqa: E402


@task(cache_policy=NO_CACHE)
def nothing(index: int) -> int:
    return index


def seconds_a_task(runner: TaskRunner, tasks: int, repeats: int) -> float:
    """The best of `repeats` rounds of `tasks` tasks, per task, on one flow's `runner`
    (its workers started by a first round, not timed)."""

    @flow(task_runner=runner)
    def rounds() -> list[float]:
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            assert [f.result() for f in nothing.map(range(tasks))] == list(range(tasks))
            times.append((time.perf_counter() - start) / tasks)
        return times[1:]

    return min(rounds())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with prefect_api():
        ours = seconds_a_task(task_runner(None, args.workers), args.tasks, args.repeats)
        stock = seconds_a_task(ProcessPoolTaskRunner(args.workers), args.tasks, args.repeats)
    print(f"a task on {args.workers} pool workers, best of {args.repeats} rounds of {args.tasks}")
    print_ms_ratio(("flows.runners", ours), ("Prefect's ProcessPoolTaskRunner", stock), 1.2)


if __name__ == "__main__":
    main()
