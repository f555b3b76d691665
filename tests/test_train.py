"""The training loop: resume bit-identity, learning on tiny data, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alexnet.lmdb_store import write_store
from alexnet.train import Interrupted, TrainConfig, Trainer, TrainError, errors


def trainer(data, tmp_path, **options) -> Trainer:
    options = {"model": {"init": "caffe", "dropout": 0.5}, **options}
    config = TrainConfig(batch_size=4, val_batch_size=4, checkpoint_every=1, **options)
    return Trainer(config, data / "train", data / "val", data / "stats", tmp_path / "ckpt.pt")


def run_to_end(t: Trainer) -> None:
    t.resume()
    while not t.finished():
        t.run_epoch()


def test_resumed_run_ends_with_the_same_weights_bit_for_bit(data, tmp_path):
    whole = trainer(data, tmp_path / "a", epochs=2)
    run_to_end(whole)

    first = trainer(data, tmp_path / "b", epochs=2)

    def stop_in_epoch_two(step, total):
        if first.epoch == 1 and step == 1:
            first.stop_requested = True  # what the SIGTERM handler does

    with pytest.raises(Interrupted):
        while not first.finished():
            first.run_epoch(on_step=stop_in_epoch_two)
    resumed = trainer(data, tmp_path / "b", epochs=2)
    assert resumed.resume() and (resumed.epoch, resumed.step) == (1, 1)
    run_to_end(resumed)
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name

    def timeless(history):
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in history]

    assert timeless(resumed.history) == timeless(whole.history)


def test_checkpoint_of_other_params_is_not_resumed(data, tmp_path):
    t = trainer(data, tmp_path, epochs=1)
    t.run_epoch()
    heard = []
    assert trainer(data, tmp_path, epochs=1).resume(heard.append) and heard == []
    assert not trainer(data, tmp_path, epochs=1, lr=0.02).resume()


def recode(checkpoint: Path, name: str) -> None:
    """Make `checkpoint` look written by other code: `name`'s recorded digest differs."""
    state = torch.load(checkpoint, weights_only=True)
    state["code"][name] = "0" * 16
    torch.save(state, checkpoint)


def test_a_finished_run_of_other_code_is_trained_again(data, tmp_path):
    # dvc repro reruns train when its code changed: the model must be the new code's.
    run_to_end(trainer(data, tmp_path, epochs=1))
    recode(tmp_path / "ckpt.pt", "lrn_cpu.py")
    heard, again = [], trainer(data, tmp_path, epochs=1)
    assert not again.resume(heard.append) and again.epoch == 0
    assert len(heard) == 1 and "training again" in heard[0] and "lrn_cpu.py changed" in heard[0]


def test_an_unfinished_run_of_other_code_resumes_with_a_warning(data, tmp_path):
    # A run that crashed on a bug goes on after the fix, and says so.
    trainer(data, tmp_path, epochs=2).run_epoch()
    recode(tmp_path / "ckpt.pt", "model.py")
    heard, again = [], trainer(data, tmp_path, epochs=2)
    assert again.resume(heard.append) and (again.epoch, again.step) == (1, 0)
    assert len(heard) == 1 and heard[0].startswith("warning") and "model.py changed" in heard[0]


def test_learns_the_tiny_task(data, tmp_path):
    config = TrainConfig(
        batch_size=5,
        val_batch_size=4,
        epochs=6,
        lr=0.01,
        lighting=0.0,
        checkpoint_every=100,
        model={"init": "caffe", "dropout": 0.0},
    )
    t = Trainer(config, data / "train", data / "val", data / "stats", tmp_path / "c.pt")
    run_to_end(t)
    losses = [r["train_loss"] for r in t.history]
    assert losses[-1] < losses[0] * 0.8, losses
    assert t.history[-1]["val_top1_error"] <= 0.25


def test_export_is_weights_only_loadable(data, tmp_path):
    t = trainer(data, tmp_path, epochs=1)
    t.run_epoch()
    t.export(tmp_path / "alexnet.pt")
    payload = torch.load(tmp_path / "alexnet.pt", weights_only=True)
    assert payload["classes"] == CLASSES and payload["model"]["num_classes"] == 2
    assert payload["mean"].shape == (3, 256, 256)


def test_clear_errors(data, tmp_path):
    with pytest.raises(TrainError, match="model has 5 classes, the data 2"):
        trainer(data, tmp_path, epochs=1, model={"num_classes": 5})
    if not torch.cuda.is_available():
        with pytest.raises(TrainError, match="CUDA is not available"):
            trainer(data, tmp_path, epochs=1, device="cuda:0")
    with pytest.raises(TrainError, match="missing or corrupt stats"):
        Trainer(TrainConfig(), data / "train", data / "val", tmp_path, tmp_path / "c.pt")


def test_topk_errors_count_ties_for_the_label():
    logits = torch.tensor([[3.0, 1.0, 2.0], [1.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    labels = torch.tensor([0, 1, 2])
    assert errors(logits, labels) == (1, 0)  # row 2: label ranks second (top-1 wrong)


def test_train_flow_writes_model_metrics_plots_and_resumes(data, tmp_path, prefect_server):
    from alexnet.params import ModelParams, TrainParams
    from flows.train import train_flow

    params = TrainParams(epochs=1, batch_size=5, val_batch_size=4, lighting=0.0)
    model = ModelParams(init="caffe")
    run = dict(
        lmdb=str(tmp_path / "lmdb"),
        stats=str(data / "stats"),
        model_path=str(tmp_path / "models" / "alexnet.pt"),
        checkpoint=str(tmp_path / "ckpt" / "t.pt"),
        metrics=str(tmp_path / "metrics"),
        params=params,
        model=model,
    )
    (tmp_path / "lmdb").mkdir()
    for split in ("train", "val"):
        (tmp_path / "lmdb" / split).symlink_to(data / split)
    summary = train_flow(**run)
    assert summary["epochs"] == 1
    assert json.loads((tmp_path / "metrics" / "train.json").read_text()) == summary
    assert (tmp_path / "metrics" / "train" / "plots" / "metrics" / "val_top1_error.tsv").exists()
    assert torch.load(tmp_path / "models" / "alexnet.pt", weights_only=True)["classes"] == CLASSES
    # Same params again: the finished checkpoint is resumed, nothing is retrained.
    again = train_flow(**{**run, "params": params})
    assert again == summary


def test_bf16_autocast_and_channels_last_steps_on_cpu(data, tmp_path):
    t = trainer(data, tmp_path, epochs=1, amp=True, channels_last=True)
    record = t.run_epoch()
    assert np.isfinite(record["train_loss"]) and t.model.features[0].weight.dtype == torch.float32


def test_out_of_memory_names_the_batch_size(data, tmp_path):
    t = trainer(data, tmp_path, epochs=1)

    class Exhausted(torch.nn.Module):
        def forward(self, inputs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    t.net = Exhausted()
    with pytest.raises(
        TrainError, match="out of memory on cpu at batch size 4; lower train.batch_size"
    ):
        t.run_epoch()


def test_loader_workers_stream_the_same_batches_across_epochs(data, tmp_path):
    # Two persistent worker processes read ahead over an epoch boundary; the run is the
    # one the in-loop reader gives, bit for bit (and a checkpoint stays resumable).
    inline = trainer(data, tmp_path / "a", epochs=2)
    run_to_end(inline)
    ahead = trainer(data, tmp_path / "b", epochs=2, loader_workers=2)
    run_to_end(ahead)
    for name, value in inline.model.state_dict().items():
        assert torch.equal(value, ahead.model.state_dict()[name]), name
    assert ahead.digest == inline.digest


def test_cli_train_killed_with_sigkill_resumes_to_the_same_weights(data, tmp_path, prefect_server):
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from tests.helpers import REPO

    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "train": {"epochs": 2, "batch_size": 2, "val_batch_size": 4, "checkpoint_every": 1},
                "model": {"init": "caffe"},
            }
        )
    )

    def command(name: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "alexnet.cli",
            "train",
            str(data),
            str(data / "stats"),
            str(tmp_path / name / "alexnet.pt"),
            "--checkpoint",
            str(tmp_path / name / "ckpt.pt"),
            "-p",
            "params.yaml",
        ]

    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the session's Prefect server, inherited
    first = subprocess.Popen(
        command("killed"),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = tmp_path / "killed" / "ckpt.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL and checkpoint.exists()
    assert not (tmp_path / "killed" / "alexnet.pt").exists()
    again = subprocess.run(command("killed"), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stdout + again.stderr
    # An uninterrupted run of the same command, in the same kind of process.
    whole = subprocess.run(command("whole"), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]
    resumed = torch.load(tmp_path / "killed" / "alexnet.pt", weights_only=True)["state_dict"]
    for name, value in torch.load(tmp_path / "whole" / "alexnet.pt", weights_only=True)[
        "state_dict"
    ].items():
        assert torch.equal(value, resumed[name]), name


def test_a_diverging_run_stops_with_one_clear_line(data, tmp_path):
    t = trainer(data, tmp_path, epochs=1, lr=1e6)
    with pytest.raises(TrainError, match="training diverged; lower train.lr"):
        t.run_epoch()
