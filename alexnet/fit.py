"""A whole training run, the one function that runs one: `fit(run, world, log)`.

It sets the determinism the params ask for, resumes from a checkpoint of this run,
trains to the end with a progress bar and a log line per epoch, and writes dvclive
metrics and plots, `metrics/train.json` and the model file. The train flow calls it in
its own process for one-process training; for data-parallel training it launches
torchrun, whose every process runs `python -m alexnet.fit RUN_JSON` -> `main` ->
the same `fit` (rank 0 reports and writes, the other ranks only train).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from rich.progress import Progress

from alexnet.atomic import write_json
from alexnet.distributed import World
from alexnet.errors import Interrupted, is_user_error, user_line
from alexnet.orphans import die_with_parent
from alexnet.runtime import configure
from alexnet.train import EveryRankError, Trainer, TrainRun, sole_writer
from alexnet.train_files import LIVE, SUMMARY

METRICS = (
    "train_loss",
    "train_top1_error",
    "val_loss",
    "val_top1_error",
    "val_top5_error",
    "lr",
    "images_per_s",
)


def summary(history: list[dict]) -> dict:
    """`metrics/train.json`: the last epoch's metrics and the number of epochs."""
    return {**{key: history[-1][key] for key in METRICS}, "epochs": len(history)}


@contextmanager
def stop_on_sigterm(trainer: Trainer) -> Iterator[None]:
    """While inside: SIGTERM finishes the current step, checkpoints, then raises
    `Interrupted`. The previous handler comes back on the way out."""

    def request_stop(signum, frame):
        trainer.stop_requested = True

    try:
        previous = signal.signal(signal.SIGTERM, request_stop)
    except ValueError:  # not the main thread: no handler; a kill falls back to checkpoints
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def fit(run: TrainRun, world: World = World(), log: Callable[[str], None] = print) -> list[dict]:
    """Train `run` (resuming its checkpoint when it belongs to it) to the end; returns
    the per-epoch records. Raises `Interrupted` after checkpointing on SIGTERM."""
    # Bit-repeatable CPU runs; on CUDA this also needs CUBLAS_WORKSPACE_CONFIG=:4096:8.
    # Set for this training only: the caller's settings come back afterwards.
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(run.train.deterministic, warn_only=True)
    try:
        with sole_writer(run.checkpoint, world, log if world.main else lambda line: None):
            return _fit(run, world, log)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _fit(run: TrainRun, world: World, log: Callable[[str], None]) -> list[dict]:
    from dvclive import Live

    trainer = Trainer(run, world)
    say = log if world.main else (lambda line: None)
    resumed = trainer.resume(say)
    if resumed and trainer.finished():  # e.g. its model file was deleted
        say(f"{run.checkpoint}: this run has finished (epoch {trainer.epoch}); writing its files")
    elif resumed:
        say(f"resuming from {run.checkpoint} at epoch {trainer.epoch + 1}, step {trainer.step}")
    live = None
    if world.main:
        live = Live(str(run.metrics / LIVE), dvcyaml=False, save_dvc_exp=False, report=None)
        live.log_params(run.params())  # (`alexnet report` shows them)
    for record in trainer.history:  # a resumed run's plots start from epoch 1
        _log(live, record)
    # One bar for the run (its time left is the run's), not one an epoch: 90 on ImageNet.
    steps, epochs = trainer.steps_per_epoch(), run.train.epochs
    with stop_on_sigterm(trainer), Progress(disable=not world.main) as progress:
        done = trainer.epoch * steps + trainer.step
        bar = progress.add_task("train", total=epochs * steps, completed=done)

        def advance(step: int, total: int) -> None:  # (the epoch counts on after its end)
            progress.update(bar, completed=trainer.epoch * total + step)

        while not trainer.finished():
            progress.update(bar, description=f"epoch {trainer.epoch + 1}/{epochs}")
            record = trainer.run_epoch(on_step=advance)
            say(f"epoch {record['epoch']}: " + ", ".join(f"{k} {record[k]:.4g}" for k in METRICS))
            _log(live, record)
    if world.main:
        live.end()
        trainer.export(run.model_path)
        write_json(run.metrics / SUMMARY, summary(trainer.history))
    return trainer.history


def _log(live, record: dict) -> None:
    if live is None:
        return
    for key in METRICS:
        live.log_metric(key, record[key])
    live.next_step()


def follow_launcher() -> bool:
    """Be sent SIGTERM when torchrun dies; False if it died as this was asked. torchrun
    starts each worker in a session of its own, so a stop sent to the stage's process
    group reaches torchrun alone, which passes it on; a torchrun that dies first (killed
    after a grace, the OOM killer) would leave its workers training on, orphaned, on the
    GPUs the next run needs. With this, each checkpoints and ends, as when torchrun
    passes the stop on. (One that died while this worker imported torch, before the
    request, is not seen: a few seconds at the start.)"""
    return die_with_parent(signal.SIGTERM, os.getppid())


# How long a rank that leaves an error to its node's first rank waits before it ends
QUIET_RANK_WAIT_S = 2.0


def main(argv: list[str]) -> int:
    """One torchrun process: join the group, then `fit`."""
    if not follow_launcher():
        return 143
    configure()
    rank = os.environ.get("RANK", "0")  # torchrun's, as the group's
    world = World()
    try:
        run = TrainRun.model_validate_json(argv[0])
        world = World.from_env(run.train.device)  # a GPU that is not there: one line
        fit(run, world, lambda line: print(line, flush=True))
    except Interrupted as stop:
        if rank == "0":
            print(f"train: {stop}; checkpoint saved", flush=True)
        return 143
    except KeyboardInterrupt:  # Ctrl-C, passed on by torchrun: the stage says it, once
        return 130
    except Exception as error:
        if not is_user_error(error):
            raise
        who = f"rank {rank}: "
        if isinstance(error, EveryRankError):  # each node's console, once
            if os.environ.get("LOCAL_RANK", "0") != "0":
                # (torchrun stops the others when one ends: the node's first rank, which
                # says it, must not be stopped before it has)
                time.sleep(QUIET_RANK_WAIT_S)
                return 1
            who = ""
        print(f"error: {who}{user_line(error)}", file=sys.stderr, flush=True)
        return 1
    finally:
        world.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
