"""Flow of the train stage: the recipe on the LMDB stores, resumable, with live metrics.

The flow only chooses how to launch `alexnet.fit.fit`, the one function that runs a
training: in this process, or, with `nproc_per_node` or `nnodes` above 1, in every
process torchrun starts (`python -m alexnet.fit RUN_JSON`, data parallel with DDP;
rank 0 writes the same files as a one-process run; on several nodes the rendezvous
picks its node, so `models/` and `metrics/` are shared by all of them).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from alexnet.errors import Interrupted
from alexnet.fit import METRICS, fit, summary
from alexnet.orphans import WORKER_GRACE_S
from alexnet.params import ComputeParams, ModelParams, PrepareParams, TrainParams
from alexnet.threads import share_of_cores
from alexnet.train import TrainError, TrainRun, load_history, refuse


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
        "alexnet.distributed",  # torchrun, quieter (`alexnet.distributed.launch`)
        *where,
        "--nnodes",
        str(params.nnodes),
        "--nproc-per-node",
        str(params.nproc_per_node),
        "-m",
        "alexnet.fit",
        argument,
    ]


# How long torchrun's agent waits for its workers after passing a SIGTERM on, before it
# kills them: a worker stops at its next read of the losses (within train.sync_every
# steps), then writes its checkpoint. torch's default, 30 s, can cut that write short.
# (TORCH_ELASTIC_SHUTDOWN_TIMEOUT in the environment, where set, is kept.)
STOP_GRACE_S = WORKER_GRACE_S


def worker_environment(params: TrainParams) -> dict[str, str]:
    """What torchrun's workers get besides this process's environment (which wins):
    each its share of the node's cores. torchrun gives each one OpenMP thread where
    OMP_NUM_THREADS is unset, and a rank training on the CPU then used one core."""
    return {"OMP_NUM_THREADS": str(share_of_cores(params.nproc_per_node))}


# torchrun's own C++ logs, in its process only: a rendezvous it cannot reach printed the
# store's retries with ~30 lines of C++ frames each, before the one line that says why
# (`alexnet.distributed.launch`, which gives its workers the default level back).
QUIET_AGENT = {"TORCH_CPP_LOG_LEVEL": "FATAL", "ALEXNET_QUIET_AGENT": "1"}


def _launch(command: list[str], extra: dict[str, str] | None = None) -> None:
    """Run torchrun (with `extra` in its environment where not set there); SIGTERM to
    this process is passed on (torchrun passes it to the workers, which checkpoint) and
    ends in `Interrupted`; otherwise the workers' exit status becomes our error."""
    environment = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(STOP_GRACE_S), **(extra or {})}
    environment.update(os.environ)
    if "TORCH_CPP_LOG_LEVEL" not in environment:  # (one the user set is theirs)
        environment.update(QUIET_AGENT)
    process = subprocess.Popen(command, env=environment)
    stopped: list[int] = []

    def stop(signum: int, frame: object) -> None:
        if not stopped:  # once: a second SIGTERM makes torchrun leave its workers behind
            process.terminate()
        stopped.append(signum)

    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread
        previous = None
    try:
        try:
            code = process.wait()
        except KeyboardInterrupt:
            _stop_on_ctrl_c(process)
            raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    # torchrun exits with 143 on a SIGTERM (`alexnet.distributed.launch`), after its workers
    if code != 0 and (stopped or code in (143, -signal.SIGTERM)):
        raise Interrupted("stopped by SIGTERM")
    if code != 0:
        raise TrainError(f"torchrun exited with status {code} (its error is above)")


# How long a Ctrl-C waits for torchrun to stop on the SIGINT it had too, before passing one on
CTRL_C_WAIT_S = 10


def _stop_on_ctrl_c(process: subprocess.Popen) -> None:
    """Wait for torchrun to stop its workers, which the next run must not find still
    holding the GPUs and the checkpoint. A terminal's Ctrl-C reached torchrun too (one
    process group), and its workers end at once on it; a SIGINT sent to this process
    alone (`kill -INT`, a supervisor) is passed on. A second Ctrl-C stops the wait."""
    try:
        process.wait(timeout=CTRL_C_WAIT_S)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        process.wait()


@flow(name="train")
def train_flow(
    lmdb: str,
    stats: str,
    model_path: str,
    checkpoint: str,
    metrics: str,
    train: TrainParams,
    model: ModelParams,
    prepare: PrepareParams,
    compute: ComputeParams,
) -> dict:
    """Train (or resume) and write the model file, metrics/train.json and dvclive plots."""
    logger = get_run_logger()
    refuse(lmdb, stats, model_path, checkpoint, metrics, train)
    run = TrainRun(
        train=train,
        model=model,
        image=prepare.image_options(),
        kernels=compute.kernels,
        jpeg_decoder=compute.jpeg_decoder,
        lmdb=Path(lmdb),
        stats=Path(stats),
        model_path=Path(model_path),
        checkpoint=Path(checkpoint),
        metrics=Path(metrics),
    )
    if train.nproc_per_node * train.nnodes > 1:
        command = torchrun_command(train, run.model_dump_json())
        logger.info(
            "launching %d x %d processes: %s",
            train.nnodes,
            train.nproc_per_node,
            " ".join(command[:-1]),
        )
        _launch(command, worker_environment(train))
        history = load_history(run.checkpoint)
    else:
        history = fit(run, log=logger.info)

    def rounded(value):
        return round(value, 4) if isinstance(value, float) else value

    rows = [{key: rounded(r[key]) for key in ("epoch", *METRICS)} for r in history]
    create_table_artifact(rows, key="train-epochs", description="Training, one row per epoch")
    return summary(history)


if __name__ == "__main__":
    from flows.stages import main

    main("train", train_flow)
