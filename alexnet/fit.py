"""A whole training run with what the user sees: a progress bar per epoch, a log line
per epoch, dvclive metrics and plots, `metrics/train.json` and the model file.

`fit` is called in the train flow's process for one-process training, and in every
process that torchrun starts for data-parallel training (`python -m alexnet.fit SPEC`,
launched by the train flow): rank 0 reports and writes, the other ranks only train.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from rich.progress import Progress

from alexnet.atomic import write_json
from alexnet.distributed import World
from alexnet.errors import AlexnetError
from alexnet.train import Interrupted, TrainConfig, Trainer

METRICS = (
    "train_loss",
    "train_top1_error",
    "val_loss",
    "val_top1_error",
    "val_top5_error",
    "lr",
    "images_per_s",
)


def stop_on_sigterm(trainer: Trainer) -> None:
    """SIGTERM: finish the current step, checkpoint, then raise `Interrupted`."""

    def request_stop(signum, frame):
        trainer.stop_requested = True

    try:
        signal.signal(signal.SIGTERM, request_stop)
    except ValueError:  # not the main thread: no handler; a kill falls back to checkpoints
        pass


def fit(
    trainer: Trainer, model_path: Path, metrics: Path, log: Callable[[str], None] = print
) -> dict:
    """Train `trainer` (already resumed or fresh) to the end; returns the summary."""
    from dvclive import Live

    main = trainer.world.main
    live = (
        Live(str(metrics / "train"), dvcyaml=False, save_dvc_exp=False, report=None)
        if (main)
        else None
    )
    for record in trainer.history:  # a resumed run's plots start from epoch 1
        _log(live, record)
    with Progress(disable=not main) as progress:
        while not trainer.finished():
            label = f"epoch {trainer.epoch + 1}/{trainer.config.epochs}"
            bar = progress.add_task(label, total=trainer.steps_per_epoch(), completed=trainer.step)
            record = trainer.run_epoch(
                on_step=lambda step, total, bar=bar: progress.update(bar, completed=step)
            )
            if main:
                log(
                    f"epoch {record['epoch']}: "
                    + ", ".join(f"{k} {record[k]:.4g}" for k in METRICS)
                )
            _log(live, record)
    summary = {**{k: trainer.history[-1][k] for k in METRICS}, "epochs": len(trainer.history)}
    if main:
        live.end()
        trainer.export(model_path)
        write_json(metrics / "train.json", summary)
    return summary


def _log(live, record: dict) -> None:
    if live is None:
        return
    for key in METRICS:
        live.log_metric(key, record[key])
    live.next_step()


def spec(
    config: TrainConfig, lmdb: Path, stats: Path, model_path: Path, checkpoint: Path, metrics: Path
) -> str:
    """The command-line argument of `python -m alexnet.fit`: everything as JSON."""
    return json.dumps(
        {
            "config": asdict(config),
            "lmdb": str(lmdb),
            "stats": str(stats),
            "model_path": str(model_path),
            "checkpoint": str(checkpoint),
            "metrics": str(metrics),
        }
    )


def main(argv: list[str]) -> int:
    """One torchrun process: join the group, resume, train, report from rank 0."""
    run = json.loads(argv[0])
    config = TrainConfig(**run["config"])
    world = World.from_env(config.device)
    try:
        lmdb = Path(run["lmdb"])
        trainer = Trainer(
            config, lmdb / "train", lmdb / "val", Path(run["stats"]), Path(run["checkpoint"]), world
        )
        say = (lambda line: print(line, flush=True)) if world.main else (lambda line: None)
        if trainer.resume(say):
            say(
                f"resuming from {run['checkpoint']} at epoch {trainer.epoch + 1}, "
                f"step {trainer.step}"
            )
        stop_on_sigterm(trainer)
        fit(
            trainer,
            Path(run["model_path"]),
            Path(run["metrics"]),
            lambda line: print(line, flush=True),
        )
    except Interrupted as stop:
        if world.main:
            print(f"train: {stop}; checkpoint saved", flush=True)
        return 143
    except AlexnetError as error:
        print(f"error: rank {world.rank}: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        world.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
