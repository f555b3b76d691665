"""Flow of the train stage: the recipe on the LMDB stores, resumable, with live metrics."""

from __future__ import annotations

import signal
from dataclasses import fields
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from rich.progress import Progress

from alexnet.atomic import write_json
from alexnet.params import ModelParams, TrainParams
from alexnet.train import TrainConfig, Trainer

METRICS = ("train_loss", "train_top1_error", "val_loss", "val_top1_error", "val_top5_error",
           "lr", "images_per_s")  # fmt: skip


def _config(train: TrainParams, model: ModelParams) -> TrainConfig:
    values = {f.name: getattr(train, f.name) for f in fields(TrainConfig) if hasattr(train, f.name)}
    return TrainConfig(**values, model=model.model_dump())


def _on_sigterm(trainer: Trainer) -> None:
    def request_stop(signum, frame):
        trainer.stop_requested = True  # checkpoint after the current step, then exit

    try:
        signal.signal(signal.SIGTERM, request_stop)
    except ValueError:  # not the main thread: no handler, kills fall back to checkpoints
        pass


@flow(name="train")
def train_flow(
    lmdb: str = "data/lmdb",
    stats: str = "data/stats",
    model_path: str = "models/alexnet.pt",
    checkpoint: str = "models/checkpoints/train.pt",
    metrics: str = "metrics",
    params: TrainParams = TrainParams(),
    model: ModelParams = ModelParams(),
) -> dict:
    """Train (or resume) and write the model file, metrics/train.json and dvclive plots."""
    from dvclive import Live

    logger = get_run_logger()
    trainer = Trainer(_config(params, model), Path(lmdb) / "train", Path(lmdb) / "val",
                      Path(stats), Path(checkpoint))  # fmt: skip
    if trainer.resume():
        logger.info(
            "resuming from %s at epoch %d, step %d", checkpoint, trainer.epoch + 1, trainer.step
        )
    _on_sigterm(trainer)
    live = Live(str(Path(metrics) / "train"), dvcyaml=False, save_dvc_exp=False, report=None)
    for record in trainer.history:  # a resumed run's plots start from epoch 1
        _log(live, record)
    with Progress() as progress:
        while not trainer.finished():
            label = f"epoch {trainer.epoch + 1}/{params.epochs}"
            bar = progress.add_task(label, total=trainer.steps_per_epoch(), completed=trainer.step)
            record = trainer.run_epoch(
                on_step=lambda step, total, bar=bar: progress.update(bar, completed=step)
            )
            logger.info("epoch %d: " + ", ".join(f"{k} %.4g" for k in METRICS), record["epoch"],
                        *(record[k] for k in METRICS))  # fmt: skip
            _log(live, record)
    live.end()
    trainer.export(Path(model_path))
    summary = {**{k: trainer.history[-1][k] for k in METRICS}, "epochs": len(trainer.history)}
    write_json(Path(metrics) / "train.json", summary)
    rows = [{k: round(r[k], 4) if isinstance(r[k], float) else r[k] for k in ("epoch", *METRICS)}
            for r in trainer.history]  # fmt: skip
    create_table_artifact(rows, key="train-epochs", description="Training, one row per epoch")
    return summary


def _log(live, record: dict) -> None:
    for key in METRICS:
        live.log_metric(key, record[key])
    live.next_step()
