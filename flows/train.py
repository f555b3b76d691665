"""Flow of the train stage: the recipe on the LMDB stores, resumable, with live metrics.

One process trains in the flow's own process. With `nproc_per_node` or `nnodes` above 1
the flow launches torchrun, which starts that many `python -m alexnet.fit` processes
(data parallel, DDP); rank 0 writes the same files as a one-process run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import torch
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from alexnet.fit import METRICS, fit, spec, stop_on_sigterm
from alexnet.params import ModelParams, TrainParams
from alexnet.train import Interrupted, TrainConfig, Trainer, TrainError


def _config(train: TrainParams, model: ModelParams) -> TrainConfig:
    values = {f.name: getattr(train, f.name) for f in fields(TrainConfig) if hasattr(train, f.name)}
    if isinstance(train.device, list):  # [cuda:0, cuda:1] -> "cuda:0,cuda:1"
        values["device"] = ",".join(train.device)
    return TrainConfig(**values, model=model.model_dump())


def torchrun_command(params: TrainParams, argument: str) -> list[str]:
    """torchrun for `python -m alexnet.fit`: standalone on one node, else a c10d
    rendezvous at `rdzv_endpoint` that every node's `alexnet train` joins."""
    where = (
        ["--standalone"]
        if params.nnodes == 1
        else ["--rdzv-backend", "c10d", "--rdzv-endpoint", params.rdzv_endpoint]
    )
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *where,
        "--nnodes",
        str(params.nnodes),
        "--nproc-per-node",
        str(params.nproc_per_node),
        "-m",
        "alexnet.fit",
        argument,
    ]


def _launch(command: list[str]) -> None:
    """Run torchrun; SIGTERM to this process is passed on (torchrun passes it to the
    workers, which checkpoint), and the workers' exit status becomes our error."""
    process = subprocess.Popen(command)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, lambda signum, frame: process.terminate())
    except ValueError:  # not the main thread
        previous = None
    try:
        code = process.wait()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if code in (143, -signal.SIGTERM):
        raise Interrupted("stopped by SIGTERM")
    if code != 0:
        raise TrainError(f"torchrun exited with status {code} (the worker's error is above)")


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
    logger = get_run_logger()
    config = _config(params, model)
    paths = Path(lmdb), Path(stats), Path(model_path), Path(checkpoint), Path(metrics)
    if params.nproc_per_node * params.nnodes > 1:
        command = torchrun_command(params, spec(config, *paths))
        logger.info(
            "launching %d x %d processes: %s",
            params.nnodes,
            params.nproc_per_node,
            " ".join(command[:-1]),
        )
        _launch(command)
        history = torch.load(model_path, weights_only=True)["history"]
    else:
        trainer = Trainer(
            config, Path(lmdb) / "train", Path(lmdb) / "val", Path(stats), Path(checkpoint)
        )
        if trainer.resume(logger.info):
            logger.info(
                "resuming from %s at epoch %d, step %d", checkpoint, trainer.epoch + 1, trainer.step
            )
        stop_on_sigterm(trainer)
        fit(trainer, Path(model_path), Path(metrics), logger.info)
        history = trainer.history
    last = history[-1]
    summary = {**{k: last[k] for k in METRICS}, "epochs": len(history)}
    rows = [
        {k: round(r[k], 4) if isinstance(r[k], float) else r[k] for k in ("epoch", *METRICS)}
        for r in history
    ]
    create_table_artifact(rows, key="train-epochs", description="Training, one row per epoch")
    return summary
