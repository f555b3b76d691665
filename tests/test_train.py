"""The training loop: resume bit-identity, the recipe's wiring, learning on tiny data,
clear errors, and the train stage's command killed or stopped and run again."""

from __future__ import annotations

import copy
import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from alexnet.errors import AlexnetError, Interrupted
from alexnet.jpeg import decode_threads
from alexnet.lmdb_store import write_store
from alexnet.reader import LmdbSplit
from alexnet.stats import load_stats, save_stats
from alexnet.train import (
    EveryRankError,
    Steps,
    Trainer,
    TrainError,
    misfits,
    set_aside_path,
)
from alexnet.train_files import params_file
from tests.helpers import (
    CLASSES,
    DEAD_PID,
    EPOCH_ENDS,
    REPO,
    TEST_MODEL,
    assert_updates_within,
    assert_writes_what_dvc_tracks,
    blobs,
    jpeg_training_data,
    run_python,
    train_run,
)

# Batch 4 over 10 images: steps of 4, 4, 2. A test that needs no particular steps
# takes batch 10, one step per epoch (the cheapest epoch).
TWO_EPOCHS = {"epochs": 2, **EPOCH_ENDS}
ONE_STEP = {"batch_size": 10, **EPOCH_ENDS}


def trainer(data, folder, model=None, **train) -> Trainer:
    return Trainer(train_run(data, folder, model, **train))


def run_to_end(t: Trainer) -> None:
    t.resume()
    while not t.finished():
        t.run_epoch()


def stop_at(t: Trainer, epoch: int, step: int) -> None:
    """Train until `step` of `epoch` (0-based epoch), then stop as SIGTERM does."""

    def on_step(done, total):
        if t.epoch == epoch and done == step:
            t.stop_requested = True  # what the SIGTERM handler does

    with pytest.raises(Interrupted):
        while not t.finished():
            t.run_epoch(on_step=on_step)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


def timeless(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in history]


def test_resumed_run_ends_with_the_same_weights_bit_for_bit(data, tmp_path):
    whole = trainer(data, tmp_path / "whole", **TWO_EPOCHS)
    run_to_end(whole)
    first = trainer(data, tmp_path, **TWO_EPOCHS)
    stop_at(first, epoch=1, step=1)  # across an epoch boundary: schedule, history, order
    resumed = trainer(data, tmp_path, **TWO_EPOCHS)
    assert resumed.resume() and (resumed.epoch, resumed.step) == (1, 1)
    run_to_end(resumed)
    assert_same_weights(whole.model.state_dict(), resumed.model.state_dict())
    assert_same_weights(
        whole.optimizer.state_dict()["state"][0], resumed.optimizer.state_dict()["state"][0]
    )
    assert timeless(resumed.history) == timeless(whole.history)


def test_a_stop_asked_during_validation_ends_at_the_epochs_checkpoint(data, tmp_path, monkeypatch):
    # it trained one step more and saved a second checkpoint, ~0.5 GB on ImageNet
    import alexnet.train as module

    t = trainer(data, tmp_path, **TWO_EPOCHS)

    def validate(*args, **kwargs):
        t.stop_requested = True  # what the SIGTERM handler does
        return original(*args, **kwargs)

    original = module.validate
    monkeypatch.setattr(module, "validate", validate)
    saves = []
    monkeypatch.setattr(t, "save", lambda save=t.save: saves.append(save()))
    t.run_epoch()
    with pytest.raises(Interrupted, match="stopped at the end of epoch 1"):
        t.run_epoch()
    assert len(saves) == 1 and (t.epoch, t.step) == (1, 0)
    assert torch.load(t.checkpoint, weights_only=True)["step"] == 0


def test_a_checkpoint_from_before_a_param_was_added_resumes_where_it_is_at_its_default(
    data, tmp_path
):
    stop_at(trainer(data, tmp_path, epochs=1), epoch=0, step=1)
    checkpoint = tmp_path / "ckpt.pt"
    written = torch.load(checkpoint, weights_only=True)

    def written_before(section: str, key: str) -> None:
        """The checkpoint as a run of code without params `section.key` wrote it."""
        state = copy.deepcopy(written)
        del state["recipe"][section][key]
        state["digest"] = "0" * 64  # the digest of that recipe: not this run's
        torch.save(state, checkpoint)

    written_before("model", "lrn")  # at its default (true) in this run
    heard = []
    later = trainer(data, tmp_path, epochs=1)
    assert later.resume(heard.append) and (later.epoch, later.step) == (0, 1) and heard == []
    later.save()  # and it records this run's recipe from now on
    assert torch.load(checkpoint, weights_only=True)["digest"] == later.digest
    written_before("model", "width")  # this run's 0.125, not the default 1: the former net
    other = trainer(data, tmp_path, epochs=1)
    assert not other.resume(heard.append)
    assert heard[0].startswith(f"warning: {checkpoint} is another run's (model.width 1.0 -> 0.125)")


def test_checkpoint_of_other_params_is_set_aside_not_resumed_nor_overwritten(data, tmp_path):
    stop_at(trainer(data, tmp_path, epochs=1), epoch=0, step=1)
    heard = []
    same = trainer(data, tmp_path, epochs=1)
    assert same.resume(heard.append) and (same.epoch, same.step) == (0, 1) and heard == []
    checkpoint, aside = tmp_path / "ckpt.pt", set_aside_path(tmp_path / "ckpt.pt", same.digest)
    kept = checkpoint.read_bytes()
    other = trainer(data, tmp_path, epochs=1, lr=0.02)
    assert not other.resume(heard.append) and (other.epoch, other.step) == (0, 0)
    # a mistaken edit of params.yaml must not cost the epochs trained: kept, and named
    assert heard == [
        f"warning: {checkpoint} is another run's (train.lr 0.01 -> 0.02): starting afresh; "
        f"the checkpoint is kept as {aside}"
    ]
    assert aside.read_bytes() == kept and not checkpoint.exists()
    other.save()
    assert aside.read_bytes() == kept and checkpoint.exists()
    # The edit undone: the run set aside comes back and resumes where it was, and the
    # other run's checkpoint (a SIGTERM saves one) is kept in turn: the one slot both
    # had replaced the first run's with the second's.
    others, heard = checkpoint.read_bytes(), []
    again = trainer(data, tmp_path, epochs=1)
    assert again.resume(heard.append) and (again.epoch, again.step) == (0, 1)
    elsewhere = set_aside_path(checkpoint, other.digest)
    held = (len(kept) + len(others)) / 1e6  # (two set aside: their sum is said)
    assert heard == [
        f"warning: {checkpoint} is another run's (train.lr 0.02 -> 0.01): the checkpoint "
        f"is kept as {elsewhere} (2 set aside there hold {held:.0f} MB: remove those of "
        "runs you will not come back to)",
        f"{checkpoint}: this run's own, set aside by an earlier run, back from {aside}",
    ]
    assert checkpoint.read_bytes() == kept and elsewhere.read_bytes() == others
    assert not aside.exists()
    # and with none there (removed by hand), it comes back too
    checkpoint.unlink()
    assert trainer(data, tmp_path, epochs=1, lr=0.02).resume()
    assert checkpoint.read_bytes() == others


def test_more_epochs_continue_the_run_fewer_start_afresh(data, tmp_path):
    # The budget is in no draw nor in the schedule: a run of 1 epoch given 2 is the run
    # of 2, bit for bit; a run of 2 given 1 has later weights than a 1-epoch run's.
    whole = trainer(data, tmp_path / "whole", **TWO_EPOCHS)
    run_to_end(whole)
    run_to_end(trainer(data, tmp_path, **{**TWO_EPOCHS, "epochs": 1}))
    longer, heard = trainer(data, tmp_path, **TWO_EPOCHS), []
    assert longer.resume(heard.append) and (longer.epoch, longer.step) == (1, 0) and heard == []
    run_to_end(longer)
    assert_same_weights(whole.model.state_dict(), longer.model.state_dict())
    assert timeless(longer.history) == timeless(whole.history)
    shorter = trainer(data, tmp_path, **{**TWO_EPOCHS, "epochs": 1})
    assert not shorter.resume(heard.append) and (shorter.epoch, shorter.step) == (0, 0)
    assert len(heard) == 1 and "has trained 2 epochs, past this run's 1: starting" in heard[0]
    # The shorter run ended, then params changed: its checkpoint, of the same run as the
    # one set aside but less trained (that one's past), does not replace it.
    run_to_end(shorter)
    aside, heard = set_aside_path(tmp_path / "ckpt.pt", shorter.digest), []
    assert not trainer(data, tmp_path, **{**TWO_EPOCHS, "lr": 0.02}).resume(heard.append)
    assert heard[0].endswith(
        f"the checkpoint is dropped: {aside} holds the same run, as far or further trained"
    )
    assert torch.load(aside, weights_only=True)["epoch"] == 2


def test_checkpoint_of_other_stats_is_not_resumed(data, tmp_path):
    import json
    import shutil

    mine = shutil.copytree(data, tmp_path / "data")
    stop_at(trainer(mine, tmp_path, epochs=1), epoch=0, step=1)
    pca = json.loads((mine / "stats" / "pca.json").read_text())
    pca["eigenvalues"][0] *= 2  # the same mean image, other lighting noise
    (mine / "stats" / "pca.json").write_text(json.dumps(pca))
    heard: list[str] = []
    assert not trainer(mine, tmp_path, epochs=1).resume(heard.append)
    assert "is another run's (data.stats/pca changed)" in heard[0], heard


def recode(checkpoint: Path, name: str) -> None:
    """Make `checkpoint` look written by other code: `name`'s recorded digest differs."""
    state = torch.load(checkpoint, weights_only=True)
    assert name in state["code"], sorted(state["code"])
    state["code"][name] = "0" * 16
    torch.save(state, checkpoint)


def test_a_finished_run_of_other_code_is_trained_again(data, tmp_path):
    # dvc repro reruns train when its code changed: the model must be the new code's.
    run_to_end(trainer(data, tmp_path, epochs=1, **ONE_STEP))
    recode(tmp_path / "ckpt.pt", "alexnet/lrn_cpu.py")
    heard, again = [], trainer(data, tmp_path, epochs=1, **ONE_STEP)
    assert not again.resume(heard.append) and (again.epoch, again.step) == (0, 0)
    assert len(heard) == 1 and "holds a finished run of other training code" in heard[0]
    assert "alexnet/lrn_cpu.py changed): starting afresh" in heard[0], heard
    assert set_aside_path(tmp_path / "ckpt.pt", again.digest).exists()  # and not back


def test_an_unfinished_run_of_other_code_resumes_with_a_warning(data, tmp_path):
    # A run that crashed on a bug goes on after the fix, and says so.
    stop_at(trainer(data, tmp_path, epochs=2), epoch=0, step=1)
    recode(tmp_path / "ckpt.pt", "alexnet/model.py")
    heard, again = [], trainer(data, tmp_path, epochs=2)
    assert again.resume(heard.append) and (again.epoch, again.step) == (0, 1)
    assert len(heard) == 1 and heard[0].startswith("warning"), heard
    assert "alexnet/model.py changed" in heard[0], heard


@pytest.mark.parametrize("change", ["renamed", "resized"])
def test_an_unfinished_run_the_model_no_longer_fits_starts_afresh(data, tmp_path, change):
    # Other code renamed or resized a layer: loading raised a traceback on every run
    # after, the weights that fitted already copied in. Now set aside, weights untouched.
    stop_at(trainer(data, tmp_path, epochs=2), epoch=0, step=1)
    recode(tmp_path / "ckpt.pt", "alexnet/model.py")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    last = list(state["model"])[-1]  # loaded last: every other weight would be copied
    if change == "renamed":
        state["model"]["renamed"] = state["model"].pop(last)
    else:
        state["model"][last] = torch.cat([state["model"][last]] * 2)
    torch.save(state, tmp_path / "ckpt.pt")
    heard, again = [], trainer(data, tmp_path, epochs=2)
    initial = {name: value.clone() for name, value in again.model.state_dict().items()}
    assert not again.resume(heard.append) and (again.epoch, again.step) == (0, 0)
    assert len(heard) == 1 and "does not fit this training code (it" in heard[0], heard
    assert last in heard[0], heard  # the weight that no longer fits is named
    assert_same_weights(again.model.state_dict(), initial)
    aside = set_aside_path(tmp_path / "ckpt.pt", again.digest)
    assert aside.exists() and not (tmp_path / "ckpt.pt").exists()


def test_momenta_that_would_load_onto_other_weights_are_refused(data, tmp_path):
    # torch's optimizer gives each momentum to the weight at its place, shapes unchecked:
    # code that registers two same-shaped layers in the other order (names kept) would
    # swap their momenta without a word, one of another shape failed at the first step.
    t = trainer(data, tmp_path, epochs=1)
    stop_at(t, epoch=0, step=1)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert sorted(state["optimized"]) == sorted(name for name, _ in t.model.named_parameters())
    assert misfits(t.model, t.optimizer, state) is None
    swapped = {**state, "optimized": [state["optimized"][1], state["optimized"][0]]}
    swapped["optimized"] += state["optimized"][2:]
    first, second = state["optimized"][:2]
    assert misfits(t.model, t.optimizer, swapped) == (
        f"its momentum of {second} is at {first}'s place"
    )
    # a checkpoint without the names (before they were kept): the shapes
    older = {key: value for key, value in state.items() if key != "optimized"}
    assert misfits(t.model, t.optimizer, older) is None
    momenta = older["optimizer"]["state"]
    momenta[0], momenta[1] = momenta[1], momenta[0]  # conv1's and conv2's
    assert (
        misfits(t.model, t.optimizer, older) == "its momentum 0 does not fit this model's weights"
    )


# What running out of memory raises: Python's, and torch's CPU allocator's.
NO_MEMORY = [
    MemoryError(),
    RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate 151011328 bytes."
    ),
]


@pytest.mark.parametrize("error", NO_MEMORY, ids=["MemoryError", "torch's allocator"])
def test_a_checkpoint_this_host_cannot_load_now_is_kept(data, tmp_path, monkeypatch, error):
    # Out of memory while loading says nothing of the file: not "damaged", not set aside
    # (a set-aside, and a fresh start from epoch 0, would cost a resume for nothing).
    stop_at(trainer(data, tmp_path, epochs=2), epoch=0, step=1)
    kept = (tmp_path / "ckpt.pt").read_bytes()

    def no_memory(*args, **kwargs):
        raise error

    again = trainer(data, tmp_path, epochs=2)
    monkeypatch.setattr(torch, "load", no_memory)
    with pytest.raises(type(error)):
        again.resume()
    assert (tmp_path / "ckpt.pt").read_bytes() == kept
    assert not list(tmp_path.glob("ckpt.other-run*"))


def test_a_damaged_checkpoint_is_reported_once_and_training_starts_afresh(data, tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"\x00garbage, not a torch file" * 1000)
    heard, t = [], trainer(data, tmp_path, epochs=1)
    initial = {name: value.clone() for name, value in t.model.state_dict().items()}
    assert not t.resume(heard.append)
    assert len(heard) == 1 and "damaged" in heard[0], heard
    assert (t.epoch, t.step, t.history) == (0, 0, [])
    assert_same_weights(t.model.state_dict(), initial)
    assert (tmp_path / "ckpt.other-run-damaged.pt").read_bytes().startswith(b"\x00garbage")
    # It trains from the start, and resumes from its own checkpoint.
    stop_at(t, epoch=0, step=1)
    again = trainer(data, tmp_path, epochs=1)
    assert again.resume() and (again.epoch, again.step) == (0, 1)


@pytest.mark.parametrize("where", ["load", "stat"])
def test_a_checkpoint_that_cannot_be_read_now_is_kept_not_set_aside(
    data, tmp_path, monkeypatch, where
):
    # an I/O error (EIO, a stale NFS handle), reading it or on its stat, says nothing of
    # the file: setting it aside and starting afresh would lose its epochs
    stop_at(trainer(data, tmp_path, epochs=1), epoch=0, step=1)
    checkpoint = tmp_path / "ckpt.pt"
    kept = checkpoint.read_bytes()
    again = trainer(data, tmp_path, epochs=1)

    def unreadable(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    if where == "load":
        monkeypatch.setattr(torch, "load", unreadable)
    else:
        exists = Path.exists
        monkeypatch.setattr(
            Path, "exists", lambda path: unreadable() if path == checkpoint else exists(path)
        )
    with pytest.raises(TrainError, match=r"ckpt.pt: cannot be read \(.*Input/output error\)"):
        again.resume()
    monkeypatch.undo()
    assert checkpoint.read_bytes() == kept
    assert not list(tmp_path.glob("ckpt.other-run*"))


def test_a_file_that_is_not_a_checkpoint_is_refused_and_kept(data, tmp_path):
    # `--checkpoint models/alexnet.pt`: resuming from a model file failed on a missing
    # key, and the next checkpoint would have replaced the user's model file.
    t = trainer(data, tmp_path, epochs=1, **ONE_STEP)
    run_to_end(t)
    t.export(tmp_path / "alexnet.pt")
    model_file = (tmp_path / "alexnet.pt").read_bytes()
    run = train_run(data, tmp_path, epochs=1, **ONE_STEP)
    paths = {"checkpoint": tmp_path / "alexnet.pt", "model_path": tmp_path / "new.pt"}
    again = Trainer(run.model_copy(update=paths))
    with pytest.raises(TrainError, match="alexnet.pt: a file of torch tensors that is not a"):
        again.resume()
    assert (tmp_path / "alexnet.pt").read_bytes() == model_file


@pytest.mark.parametrize("path", ["model", "folder", "under a file"])
def test_output_paths_are_refused_before_any_work(data, tmp_path, path):
    run = train_run(data, tmp_path, epochs=1)
    (tmp_path / "a folder").mkdir()
    (tmp_path / "a file").write_text("the user's")
    change, message = {
        "model": ({"checkpoint": run.model_path}, "named as both the model file and the"),
        "folder": ({"model_path": tmp_path / "a folder"}, "a folder, where this output is a"),
        "under a file": ({"metrics": tmp_path / "a file" / "m"}, "a file, not a folder"),
    }[path]
    with pytest.raises(AlexnetError, match=message):
        Trainer(run.model_copy(update=change))
    assert (tmp_path / "a file").read_text() == "the user's"


def test_a_file_at_the_model_path_is_replaced_only_if_it_is_a_model_file(data, tmp_path):
    # A path mistyped as MODEL replaced a file of the user's, or a checkpoint (hours of
    # training), with the model, without a word.
    from alexnet.modelfile import ModelFileError

    t = trainer(data, tmp_path, epochs=1, **ONE_STEP)
    run_to_end(t)  # its checkpoint stays
    t.export(tmp_path / "alexnet.pt")
    (tmp_path / "notes.txt").write_text("the user's")
    run = train_run(data, tmp_path / "other", epochs=1, **ONE_STEP)
    for path, what in (
        (t.checkpoint, "a training checkpoint, not a model file"),
        (tmp_path / "notes.txt", "not an alexnet model file"),
    ):
        kept = path.read_bytes()
        with pytest.raises(ModelFileError, match=f"{path.name}: {what}; train would replace"):
            Trainer(run.model_copy(update={"model_path": path}))
        assert path.read_bytes() == kept
    # an earlier model file, of any version, an empty file or a link is replaced
    torch.save({"format": "alexnet-model", "version": 1}, tmp_path / "old.pt")
    (tmp_path / "link.pt").symlink_to(t.checkpoint)  # (replaced itself, not written through)
    for name in ("alexnet.pt", "old.pt", "empty.pt", "link.pt"):
        (tmp_path / name).touch()
        Trainer(run.model_copy(update={"model_path": tmp_path / name}))


def test_the_recipe_reaches_the_optimizer_and_a_plateau_divides_its_rate(
    data, tmp_path, monkeypatch
):
    # The validation curve is scripted (flat: every epoch is a plateau candidate) and
    # the steps do no arithmetic: what is tested is the wiring params -> optimizer and
    # schedule -> optimizer, not the learning.
    t = trainer(
        data,
        tmp_path,
        epochs=50,
        lr=0.02,
        momentum=0.8,
        weight_decay=1e-3,
        lr_patience=1,
        max_lr_drops=1,
    )
    weights, biases = t.optimizer.param_groups  # the biases undecayed (train.decay_biases)
    assert (weights["lr"], weights["momentum"], weights["weight_decay"]) == (0.02, 0.8, 1e-3)
    assert (biases["lr"], biases["momentum"], biases["weight_decay"]) == (0.02, 0.8, 0.0)
    assert (t.schedule.lr_patience, t.schedule.max_lr_drops) == (1, 1)
    flat = {"val_loss": 0.69, "val_top1_error": 0.5, "val_top5_error": 0.0}
    monkeypatch.setattr("alexnet.train.validate", lambda *args, **kwargs: dict(flat))
    zero = torch.tensor(0.0), torch.tensor(0)
    monkeypatch.setattr(t, "train_step", lambda images, labels, size: zero)
    monkeypatch.setattr(t, "save", lambda: None)
    rates = []
    while not t.finished():
        rates.append(t.run_epoch()["lr"])
        assert len(rates) <= 10, rates
    # Patience 1: the third flat epoch is a plateau (rate / 10), the fifth the plateau
    # after the last drop, which ends training long before the 50-epoch budget.
    assert rates == pytest.approx([0.02, 0.02, 0.02, 0.002, 0.002])
    assert all(g["lr"] == pytest.approx(0.002) for g in t.optimizer.param_groups)
    assert t.schedule.stopped and t.epoch == 5


@pytest.mark.parametrize(
    ("decay_biases", "velocity"), [(False, "paper"), (True, "paper"), (False, "torch")]
)
def test_the_update_is_the_papers_momentum_and_weight_decay(data, tmp_path, decay_biases, velocity):
    # Section 5: v <- 0.9 v - 0.0005 eps w - eps grad; w <- w + v (v starts at 0), for a
    # weight w; a bias only with train.decay_biases; the rate eps divided by 10 after the
    # second step. torch's SGD (v' = 0.9 v' + grad + 0.0005 w; w <- w - eps v') makes the
    # same steps at a constant rate; after a drop, only with train.velocity: torch.
    lr, momentum = 0.01, 0.9
    decays = 0.5  # a decay the size of the gradient: seen if wrong
    t = trainer(
        data,
        tmp_path,
        lr=lr,
        momentum=momentum,
        weight_decay=decays,
        decay_biases=decay_biases,
        velocity=velocity,
    )
    named = dict(t.model.named_parameters())
    names = ["features.0.weight", "features.4.bias", "classifier.6.weight"]  # conv1, conv2, fc8
    start = {name: named[name].detach().clone() for name in names}
    weights = {name: value.double() for name, value in start.items()}
    velocities = {name: torch.zeros_like(value) for name, value in weights.items()}
    generator = torch.Generator().manual_seed(0)
    for step in range(4):
        if step == 2:
            t.drop_rate()
            lr /= 10
        for value in named.values():
            value.grad = torch.randn(value.shape, generator=generator) / 100
        for name in names:
            grad = named[name].grad.double()
            decay = decays if decay_biases or not name.endswith("bias") else 0.0
            v, w = velocities[name], weights[name]
            if velocity == "paper":
                v = momentum * v - decay * lr * w - lr * grad
                weights[name] = w + v
            else:  # torch's, in gradient units
                v = momentum * v + grad + decay * w
                weights[name] = w - lr * v
            velocities[name] = v
        t.optimizer.step()
    got = {name: named[name].detach().double() for name in names}
    start = {name: value.double() for name, value in start.items()}
    # conv2's biases start at 1, where a float32 step rounds by ~6e-8 against updates of
    # ~3e-4 after the drop; the other form of the velocity differs by ~10% of them
    assert_updates_within(got, weights, start, rtol=1e-4)


def test_learns_the_tiny_task(data, tmp_path):
    t = trainer(
        data,
        tmp_path,
        model={"dropout": 0.0, "width": 1.0},  # the paper's net learns it
        batch_size=5,
        epochs=4,
        lr=0.02,
        lighting=0.0,
        **EPOCH_ENDS,
    )
    t.save = lambda: None  # learning, not checkpoints, is tested here (saves cost ~3 s)
    run_to_end(t)
    losses = [r["train_loss"] for r in t.history]
    assert losses[-1] < losses[0] * 0.8, losses
    assert t.history[-1]["val_top1_error"] <= 0.25


def test_export_is_a_weights_only_model_file_that_load_model_reads(data, tmp_path):
    from alexnet.modelfile import load_model

    run = train_run(data, tmp_path, epochs=1)
    t = Trainer(run)
    t.export(run.model_path)
    payload = torch.load(run.model_path, weights_only=True)
    assert (payload["format"], payload["version"]) == ("alexnet-model", 2)
    assert payload["classes"] == CLASSES and payload["model"]["num_classes"] == 2
    assert payload["mean"].shape == (3, 256, 256)
    assert payload["prepare"] == run.image and "history" not in payload
    model, _ = load_model(run.model_path)
    assert_same_weights(model.state_dict(), t.weights())


@pytest.mark.parametrize("subtract", [True, False])
def test_validation_and_the_model_file_subtract_the_mean_training_subtracted(
    data, tmp_path, monkeypatch, subtract
):
    # The ablation `train.subtract_mean: false` trained on the raw pixels, but validated
    # (the schedule's input) and exported the stats' mean, which evaluate and predict
    # then subtracted. The same centre crop must be the same input in all three.
    from alexnet.crops import centre_crop

    switches = {"random_crop": False, "flip": False, "lighting": 0.0, "lighting_scale": "std255"}
    t = trainer(data, tmp_path, subtract_mean=subtract, **switches, **ONE_STEP)
    for key in (*switches, "subtract_mean"):  # every augmentation param reaches it
        assert getattr(t.augment, key) == getattr(t.params, key)  # (switches: not defaults)
    images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    trained = t.augment.apply(images, t.augment.draw(2))
    validated = []

    def validate(model, split, mean, crop, *rest):
        validated.append(centre_crop(images, mean.cpu(), crop))
        return {"val_loss": 0.7, "val_top1_error": 0.5, "val_top5_error": 0.0}

    monkeypatch.setattr("alexnet.train.validate", validate)
    t.run_epoch()
    t.export(tmp_path / "alexnet.pt")
    exported = torch.load(tmp_path / "alexnet.pt", weights_only=True)["mean"]
    for seen in (validated[0], centre_crop(images, exported, t.crop)):
        assert torch.equal(seen, trained)
    assert torch.equal(trained, images[..., 16:240, 16:240] - (60.0 if subtract else 0.0))


def test_what_killed_saves_left_goes_with_the_next_save(data, tmp_path):
    run = train_run(data, tmp_path, epochs=1)
    killed = [tmp_path / f".ckpt.pt.tmp-{DEAD_PID}", tmp_path / f".alexnet.pt.tmp-{DEAD_PID}"]
    other = tmp_path / ".other.pt.tmp-1"  # another target's: not ours to remove
    for path in (*killed, other):
        path.write_bytes(b"a partial file of a killed save")
    trainer = Trainer(run)
    trainer.save()
    trainer.export(run.model_path)
    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert hidden == [other.name] and run.checkpoint.exists() and run.model_path.exists()


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_each_epoch_takes_every_image_once_in_its_own_order_across_ranks(ranks, monkeypatch):
    # 23 images, batches of 5 (the last short, and not divisible by 2 or 3 ranks)
    from alexnet.distributed import World
    from alexnet.train import EpochBatches

    # the "images" a rank reads are the store rows it asks for
    monkeypatch.setattr("alexnet.train.read", lambda split, rows, encoded: (rows, None))
    seen = {}
    for epoch in (0, 1):
        taken, sizes = [], []
        for rank in range(ranks):
            batches = EpochBatches(range(23), seed=7, batch_size=5, rows=World(rank, ranks).rows)
            for step in range(5):
                rows, _, size = batches[epoch, step]
                taken += rows.tolist()
                sizes.append(size)
        assert sorted(taken) == list(range(23)) and sizes == [5, 5, 5, 5, 3] * ranks, epoch
        seen[epoch] = taken
    assert seen[0] != seen[1]  # reshuffled each epoch


def test_clear_errors(data, tmp_path):
    three = [{"index": i, "wnid": f"n{i}", "name": f"c{i}"} for i in range(3)]
    (tmp_path / "lmdb").mkdir()
    (tmp_path / "lmdb" / "train").symlink_to(data / "lmdb" / "train")
    write_store(tmp_path / "lmdb" / "val", [blobs(0, 2, 9)], "raw", three, size=256)
    with pytest.raises(AlexnetError, match=r"lmdb/train and .*/lmdb/val list different classes$"):
        trainer(tmp_path, tmp_path, epochs=1)
    # an empty store (another tool's): a model file of no step, or a division by zero
    # after the first epoch
    write_store(tmp_path / "lmdb" / "val", [], "raw", CLASSES, size=256)
    with pytest.raises(TrainError, match=r"lmdb/val: no images to validate on$"):
        trainer(tmp_path, tmp_path, epochs=1)
    (tmp_path / "lmdb" / "train").unlink()
    (tmp_path / "lmdb" / "train").symlink_to(tmp_path / "lmdb" / "val")
    with pytest.raises(TrainError, match=r"lmdb/train: no images to train on$"):
        trainer(tmp_path, tmp_path, epochs=1)
    (tmp_path / "lmdb" / "train").unlink()
    (tmp_path / "lmdb" / "train").symlink_to(data / "lmdb" / "train")
    # a val store packed from a prepare of another size: a smaller one took the wrong
    # window of the mean without a word, a larger one failed at the first epoch's end
    small = [(0, np.zeros((128, 128, 3), np.uint8).tobytes())]
    classes = LmdbSplit(data / "lmdb" / "train").classes
    write_store(tmp_path / "lmdb" / "val", [small], "raw", classes, size=128)
    expected = r"lmdb/train holds 256x256 images, .*/lmdb/val 128x128: pack both from one prepare$"
    with pytest.raises(AlexnetError, match=expected):
        trainer(tmp_path, tmp_path, epochs=1)
    if not torch.cuda.is_available():
        with pytest.raises(AlexnetError, match="CUDA is not available"):
            trainer(data, tmp_path, epochs=1, device="cuda:0")
    run = train_run(data, tmp_path, epochs=1).model_copy(update={"stats": tmp_path / "none"})
    with pytest.raises(AlexnetError, match="none: no such stats folder"):
        Trainer(run)
    # stats of other images than the store's: every step failed on the mean's window
    save_stats(
        tmp_path / "small", np.full((224, 224, 3), 60, np.float32), load_stats(data / "stats")[1]
    )
    run = run.model_copy(update={"stats": tmp_path / "small"})
    message = r"small: the mean image is \(224, 224\), the store's images \(256, 256\); run stats"
    with pytest.raises(TrainError, match=message):
        Trainer(run)


def test_train_flow_writes_model_metrics_plots_and_resumes(
    data, tmp_path, prefect_server, monkeypatch
):
    from alexnet.params import ComputeParams, ModelParams, PrepareParams, TrainParams
    from flows.train import train_flow

    run = dict(
        lmdb=str(data / "lmdb"),
        stats=str(data / "stats"),
        model_path=str(tmp_path / "models" / "alexnet.pt"),
        checkpoint=str(tmp_path / "ckpt" / "t.pt"),
        metrics=str(tmp_path / "metrics"),
        train=TrainParams(epochs=1, batch_size=10, val_batch_size=4, lighting=0.0),
        model=ModelParams(**TEST_MODEL),
        prepare=PrepareParams(),
        compute=ComputeParams(),
    )
    summary = train_flow(**run)
    assert summary["epochs"] == 1
    assert json.loads((tmp_path / "metrics" / "train.json").read_text()) == summary
    assert (tmp_path / "metrics" / "train" / "plots" / "metrics" / "val_top1_error.tsv").exists()
    # the run's params beside its curves (dvclive's record): what `alexnet report` shows
    recorded = yaml.safe_load(params_file(tmp_path / "metrics").read_text())
    assert recorded["train"]["lr"] == 0.01 and recorded["train"]["lighting"] == 0.0
    assert recorded["model"]["init"] == "caffe" and recorded["prepare"]["size"] == 256
    assert recorded["compute"] == {"kernels": "fast", "jpeg_decoder": "torchvision"}
    assert torch.load(tmp_path / "models" / "alexnet.pt", weights_only=True)["classes"] == CLASSES
    assert_writes_what_dvc_tracks("train", tmp_path, ("models", "metrics"))

    # Same params again: the finished checkpoint is resumed, nothing is retrained.
    def no_training(self, on_step=None):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(Trainer, "run_epoch", no_training)
    again = train_flow(**run)
    assert again == summary


def test_two_fit_runs_write_byte_identical_model_files(data, tmp_path):
    from alexnet.distributed import World
    from alexnet.fit import fit

    was = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        for name in ("a", "b"):
            run = train_run(data, tmp_path / name, epochs=1, **ONE_STEP)
            fit(run, World(), log=lambda line: None)
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    a, b = (tmp_path / name / "alexnet.pt" for name in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()
    # fit again: the finished checkpoint writes the same file, and says it is finished
    (tmp_path / "b" / "alexnet.pt").unlink()
    heard = []
    fit(run, World(), log=heard.append)  # (fit restores the determinism settings itself)
    assert heard == [f"{run.checkpoint}: this run has finished (epoch 1); writing its files"]
    assert b.read_bytes() == a.read_bytes()


def test_a_run_has_one_progress_bar_from_where_it_resumes(data, tmp_path, monkeypatch):
    # a bar an epoch: 90 on ImageNet, none saying the run's time left
    import alexnet.fit as module
    from alexnet.distributed import World

    bars = []

    class Recorded:
        def __init__(self, disable: bool = False):
            self.added, self.updates = [], []
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def add_task(self, description, total, completed):
            self.added.append((total, completed))
            return len(self.added) - 1

        def update(self, task, **fields):
            self.updates.append((task, fields))

    monkeypatch.setattr(module, "Progress", Recorded)
    stop_at(trainer(data, tmp_path, **TWO_EPOCHS), epoch=0, step=2)  # steps 4, 4, 2
    module.fit(train_run(data, tmp_path, **TWO_EPOCHS), World(), log=lambda line: None)
    (bar,) = bars
    assert bar.added == [(6, 2)]
    assert [f["completed"] for _, f in bar.updates if "completed" in f] == [3, 4, 5, 6]
    assert [f["description"] for _, f in bar.updates if "description" in f] == [
        "epoch 1/2",
        "epoch 2/2",
    ]
    assert {task for task, _ in bar.updates} == {0}


def test_a_second_training_on_the_same_checkpoint_is_refused(data, tmp_path):
    # Two trainings given one checkpoint (another repository's run on a worker whose
    # ALEXNET_CHECKPOINT names it) set each other's aside at every save.
    from alexnet.distributed import World
    from alexnet.fit import fit
    from alexnet.train import sole_writer

    run = train_run(data, tmp_path, epochs=1, **ONE_STEP)
    with sole_writer(run.checkpoint):  # the other training's, running
        with pytest.raises(TrainError, match=r"ckpt.pt: another training is using this"):
            fit(run, World(), log=lambda line: None)
    assert not run.checkpoint.exists() and not run.model_path.exists()  # nothing done
    assert fit(run, World(), log=lambda line: None)  # once it has ended
    with sole_writer(run.checkpoint):  # and let go of by a training that ended
        pass


def test_a_checkpoint_lock_that_cannot_be_taken_is_one_line_or_a_warning(tmp_path, monkeypatch):
    # Any other failure of rank 0's lock ended it before the sum the other ranks waited
    # in (their gloo traceback); a file system without locks made training impossible.
    import errno
    import fcntl

    from alexnet.train import sole_writer

    checkpoint = tmp_path / "ckpt.pt"
    (tmp_path / "ckpt.pt.lock").mkdir()  # not a file that can be opened
    with pytest.raises(
        EveryRankError,
        match=r"ckpt.pt: its lock cannot be taken \(.*ckpt\.pt\.lock: Is a directory\)",
    ):
        with sole_writer(checkpoint):
            pass
    (tmp_path / "ckpt.pt.lock").rmdir()

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    heard = []
    with sole_writer(checkpoint, log=heard.append):
        pass
    assert heard == [
        f"warning: {tmp_path}/ckpt.pt.lock: cannot be locked here (No locks available): a "
        "second training given this checkpoint would not be refused"
    ]


def test_bf16_autocast_and_channels_last_steps_on_cpu(data, tmp_path):
    plain = trainer(data, tmp_path / "plain", epochs=1)
    t = trainer(data, tmp_path / "fast", epochs=1, amp=True, channels_last=True)
    before = t.model.features[0].weight.detach().clone()
    loss, wrong = t.train_step(*next(t.batches()))
    exact, _ = plain.train_step(*next(plain.batches()))  # the same batch and draws
    # bf16 rounds the forward: the loss moves a little, not a lot
    assert loss.item() != exact.item() and abs(loss.item() - exact.item()) < 0.05 * exact.item()
    assert 0 <= wrong <= 4
    weight = t.model.features[0].weight
    assert weight.dtype == torch.float32 and not torch.equal(weight, before)
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.model.features[0].weight.is_contiguous(memory_format=torch.channels_last)


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
    # one the in-loop reader gives, bit for bit, and the number of workers does not
    # make a checkpoint another run's: the inline run's resumes with workers.
    inline = trainer(data, tmp_path / "a", epochs=2, **ONE_STEP)
    run_to_end(inline)
    ahead = trainer(data, tmp_path / "b", epochs=2, **ONE_STEP, loader_workers=2)
    ahead.save = lambda: None  # its checkpoint is not used
    # each worker decodes with its share of the cores; validation, in this process while
    # they wait, with all of them
    assert (ahead.train.threads, ahead.val.threads) == (decode_threads(2), decode_threads(0))
    children = set(multiprocessing.active_children())
    readers = []  # the loader processes alive at each step
    step = ahead.train_step

    def counted_step(*args):
        readers.append(frozenset(set(multiprocessing.active_children()) - children))
        return step(*args)

    ahead.train_step = counted_step
    run_to_end(ahead)
    assert len(readers) == 2 * ahead.steps_per_epoch()
    assert len(set(readers)) == 1  # the same processes, across the epochs
    assert len(readers[0]) == 2
    assert set(multiprocessing.active_children()) <= children  # its workers ended with it
    assert_same_weights(inline.model.state_dict(), ahead.model.state_dict())
    assert ahead.digest == inline.digest
    other = trainer(data, tmp_path / "a", epochs=2, **ONE_STEP, loader_workers=2)
    assert other.resume() and (other.epoch, other.step) == (2, 0) and other.finished()
    assert_same_weights(other.model.state_dict(), inline.model.state_dict())


# -- the train stage's command, killed or stopped ------------------------------------
CLI_TRAIN = {
    "epochs": 2,
    "batch_size": 2,
    "val_batch_size": 4,
    "checkpoint_minutes": 0,
    "sync_every": 2,
}


@pytest.fixture(scope="module")
def cli_params(tmp_path_factory) -> Path:
    """A params file for the command: 2 epochs of 5 steps, checkpoints after steps 2, 4
    and 5 of each."""
    import yaml

    path = tmp_path_factory.mktemp("cli") / "params.yaml"
    path.write_text(yaml.safe_dump({"train": CLI_TRAIN, "model": TEST_MODEL}))
    return path


def cli_train(data, params: Path, folder: Path, elsewhere: Path | None = None) -> list[str]:
    """`alexnet train` (the console script) on the tiny data, writing into `folder`; its
    checkpoint folder/ckpt.pt, or with `elsewhere` none named (the environment's)."""
    checkpoint = ["--checkpoint", str(folder / "ckpt.pt")] if elsewhere is None else []
    return [
        str(Path(sys.executable).with_name("alexnet")),
        "train",
        str(data / "lmdb"),
        str(data / "stats"),
        str(folder / "alexnet.pt"),
        *checkpoint,
        "--metrics",
        str(folder / "metrics"),
        "-p",
        str(params),
    ]


def cli_env(elsewhere: Path | None = None) -> dict:
    """The session's Prefect server, inherited; with `elsewhere`, the checkpoint there."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return env if elsewhere is None else {**env, "ALEXNET_CHECKPOINT": str(elsewhere)}


@pytest.fixture(scope="module")
def uninterrupted(data, cli_params, tmp_path_factory) -> dict:
    """The weights of an uninterrupted run of what the command runs, trained in this
    process: the `TrainRun` the train stage builds from the params file. (A run of the
    command itself gives the same bits, and costs ~20 s more to start.)"""
    from alexnet.params import load_params
    from alexnet.train import TrainRun

    params = load_params(cli_params)
    folder = tmp_path_factory.mktemp("uninterrupted")
    run = TrainRun(
        train=params.train,
        model=params.model,
        image=params.prepare.image_options(),
        kernels=params.compute.kernels,
        jpeg_decoder=params.compute.jpeg_decoder,
        lmdb=data / "lmdb",
        stats=data / "stats",
        model_path=folder / "alexnet.pt",
        checkpoint=folder / "ckpt.pt",
        metrics=folder / "metrics",
    )
    t = Trainer(run)
    t.save = lambda: None  # only its weights are compared
    while not t.finished():
        t.run_epoch()
    return t.weights()


def start_until_checkpoint(
    data, params: Path, folder: Path, newer_than: int = -1, elsewhere: Path | None = None
) -> subprocess.Popen:
    """The command, started; returns once it has written a checkpoint (modified after
    `newer_than`, in ns). Its output goes to folder/output.txt (a pipe nobody reads
    could block it)."""
    with open(folder / "output.txt", "w") as output:
        process = subprocess.Popen(
            cli_train(data, params, folder, elsewhere),
            env=cli_env(elsewhere),
            stdout=output,
            stderr=output,
        )
    checkpoint = elsewhere or folder / "ckpt.pt"
    deadline = time.monotonic() + 120

    def written() -> bool:
        return checkpoint.exists() and checkpoint.stat().st_mtime_ns > newer_than

    while not written() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert written() and process.poll() is None, (folder / "output.txt").read_text()
    return process


def checkpoint_position(checkpoint: Path) -> tuple[int, int]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return state["epoch"], state["step"]


def resume_to_the_end(
    data, params: Path, folder: Path, whole: dict, elsewhere: Path | None = None
) -> None:
    """Run the command again: it resumes where the checkpoint is and ends with the
    uninterrupted run's weights, bit for bit."""
    checkpoint = elsewhere or folder / "ckpt.pt"
    epoch, step = checkpoint_position(checkpoint)
    again = subprocess.run(
        cli_train(data, params, folder, elsewhere),
        env=cli_env(elsewhere),
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    output = again.stdout + again.stderr
    assert f"resuming from {checkpoint} " in output, output[-2000:]
    assert f"at epoch {epoch + 1}, step {step}" in output, output[-2000:]
    resumed = torch.load(folder / "alexnet.pt", weights_only=True)["state_dict"]
    assert_same_weights(whole, resumed)


def test_cli_train_sigterm_then_sigkill_then_resume_gives_the_same_weights(
    data, cli_params, uninterrupted, tmp_path, prefect_server
):
    # SIGTERM: the step under way is finished and checkpointed, exit status 143.
    first = start_until_checkpoint(data, cli_params, tmp_path)
    first.send_signal(signal.SIGTERM)
    status = first.wait(timeout=120)
    output = (tmp_path / "output.txt").read_text()
    assert status == 143, output[-2000:]
    assert "checkpoint saved" in output and "Traceback" not in output, output[-2000:]
    assert not (tmp_path / "alexnet.pt").exists()
    # (the first checkpoint is step 2's; a kill would lose the steps after it)
    checkpoint = tmp_path / "ckpt.pt"
    stopped = checkpoint_position(checkpoint)
    assert stopped[0] == 0 and stopped[1] > 2, stopped
    # The runs after it in new folders (as a Prefect worker's, each a new temporary
    # clone), the checkpoint named by ALEXNET_CHECKPOINT (set on the workers) instead.
    # SIGKILL of the resumed run once it has checkpointed again: nothing but the
    # checkpoint survives, and the last run continues from it.
    second, last = tmp_path / "clone2", tmp_path / "clone3"
    second.mkdir(), last.mkdir()
    written = checkpoint.stat().st_mtime_ns
    killed = start_until_checkpoint(data, cli_params, second, written, elsewhere=checkpoint)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    assert f"resuming from {checkpoint} " in (second / "output.txt").read_text()
    assert checkpoint_position(checkpoint) > stopped
    assert not (second / "alexnet.pt").exists() and not (second / "checkpoints").exists()
    resume_to_the_end(data, cli_params, last, uninterrupted, elsewhere=checkpoint)


def test_reading_the_loss_every_n_steps_gives_the_run_of_reading_every_step(
    data, tmp_path, monkeypatch
):
    # The read on the host is deferred; what the steps compute must not change with it:
    # the same history and weights, bit for bit (a read that raced the device, or a
    # total added in another order, would show here).
    from alexnet.distributed import World

    reads, summed = [], World.sum

    def counted(world, values):  # each read of the unread steps is one sum over ranks
        reads.append(t.step)
        return summed(world, values)

    monkeypatch.setattr(World, "sum", counted)
    runs = {}
    for every in (1, 2):
        reads.clear()
        t = trainer(
            data,
            tmp_path / str(every),
            epochs=2,
            batch_size=2,
            sync_every=every,
            checkpoint_minutes=EPOCH_ENDS["checkpoint_minutes"],
        )
        run_to_end(t)
        runs[every] = t, list(reads)
    (each, each_reads), (deferred, deferred_reads) = runs[1], runs[2]
    # batch 2 over 10 images: 5 steps an epoch; every 2 steps and at the epoch's end
    # (then one more sum: the validation's); before them, resume's (did a checkpoint set
    # aside come back?), and at the second epoch's start whether a stop was asked
    assert each_reads == [0, 1, 2, 3, 4, 5, 5, 0, 1, 2, 3, 4, 5, 5]
    assert deferred_reads == [0, 2, 4, 5, 5, 0, 2, 4, 5, 5]
    assert timeless(deferred.history) == timeless(each.history)
    assert_same_weights(deferred.model.state_dict(), each.model.state_dict())


def test_a_nan_between_reads_names_its_step_and_keeps_the_last_good_checkpoint(data, tmp_path):
    t = trainer(data, tmp_path, epochs=1, batch_size=1, checkpoint_minutes=0, sync_every=3)
    forward, calls = t.net.forward, []

    def nan_at_step_5(inputs):
        calls.append(1)
        logits = forward(inputs)
        return logits * float("nan") if len(calls) == 5 else logits

    t.net.forward = nan_at_step_5
    with pytest.raises(EveryRankError, match="at epoch 1, step 5: training diverged") as raised:
        t.run_epoch()
    assert len(calls) == 6  # read at step 6 (every 3 steps), not before
    assert torch.load(t.checkpoint, weights_only=True)["step"] == 3  # not saved after it
    assert "\n" not in str(raised.value)


def test_an_epoch_whose_steps_end_on_a_checkpoint_is_saved_once_at_its_end(data, tmp_path):
    # 10 images, batch 1: 10 steps; every 5 steps. Step 10's checkpoint would be the
    # epoch end's but for the validation's records: one write of the ~0.5 GB, not two.
    t = trainer(data, tmp_path, epochs=1, batch_size=1, checkpoint_minutes=0, sync_every=5)
    save, saved = t.save, []
    t.save = lambda: (saved.append((t.epoch, t.step)), save())
    t.run_epoch()
    assert saved == [(0, 5), (1, 0)]  # step 5 of epoch 1, then its end
    state = torch.load(t.checkpoint, weights_only=True)
    assert (state["epoch"], state["step"], len(state["history"])) == (1, 0, 1)


def test_a_checkpoint_falls_due_at_the_first_read_past_its_minutes(data, tmp_path):
    # 10 images, batch 1: 10 steps, read every 2; each step ages the last checkpoint by
    # 20 s (and its real second or so), and one is due every minute: at step 4 (80 s),
    # then 4 steps after that one, not at step 10 (the epoch's end saves, after validation).
    t = trainer(data, tmp_path, epochs=1, batch_size=1, checkpoint_minutes=1, sync_every=2)
    saved, save, step = [], t.save, t.train_step

    def aging(*batch):
        t.saved_at -= 20
        return step(*batch)

    t.train_step = aging
    t.save = lambda: (saved.append((t.epoch, t.step)), save())
    t.run_epoch()
    assert saved == [(0, 4), (0, 8), (1, 0)]


def test_a_checkpoint_due_on_one_rank_is_saved_by_all_at_that_step(data, tmp_path, monkeypatch):
    # This rank's clock is far from due (10 minutes); another rank's is due at its
    # reads of steps 3 and 6 (the flags are summed with the losses): this rank saves
    # there too, or the ranks' next collectives would not match.
    from alexnet.distributed import World

    t = trainer(data, tmp_path, epochs=1, batch_size=1, checkpoint_minutes=10, sync_every=3)
    saved, sum_ = [], World.sum

    def with_a_due_rank(world, values):
        *values, stop, due = sum_(world, values)
        return [*values, stop, due + (t.step in (3, 6))]

    monkeypatch.setattr(World, "sum", with_a_due_rank)
    save = t.save
    t.save = lambda: (saved.append((t.epoch, t.step)), save())
    t.run_epoch()
    assert saved == [(0, 3), (0, 6), (1, 0)]
    assert torch.load(t.checkpoint, weights_only=True)["step"] == 0  # the epoch end's


@pytest.mark.parametrize("what", ["weight", "momentum"])
def test_an_update_that_overflows_is_not_checkpointed(data, tmp_path, what):
    # Step 6's loss is finite (computed before its update), but the update leaves a
    # weight (or its momentum, and so the next weights) infinite: the checkpoint of step 6
    # would hold it, and every resume with it.
    t = trainer(data, tmp_path, epochs=1, batch_size=1, checkpoint_minutes=0, sync_every=3)
    update, calls = t.update, []

    def overflowing():
        update()
        calls.append(1)
        if len(calls) == 6:
            weight = next(t.model.parameters())
            value = weight if what == "weight" else t.optimizer.state[weight]["momentum_buffer"]
            with torch.no_grad():
                value.view(-1)[7] = float("inf")

    t.update = overflowing
    with pytest.raises(EveryRankError, match="not finite after epoch 1, step 6: training diverged"):
        t.run_epoch()
    assert torch.load(t.checkpoint, weights_only=True)["step"] == 3  # the last good one


def test_the_weight_check_finds_any_value_that_is_not_finite(data, tmp_path):
    # The check reduces each tensor to its least and greatest values: NaN, +inf and -inf
    # must each show there, in any weight or momentum, on any element. (A compiled run's
    # momenta are there from the start.)
    t = trainer(data, tmp_path, epochs=1, compile=True)
    t._check_weights()  # a fresh run is finite (its momenta: zeros)
    weights = list(t.model.parameters())
    tensors = [weights[0], weights[-1], t.optimizer.state[weights[5]]["momentum_buffer"]]
    for tensor in tensors:
        for bad in (float("nan"), float("inf"), -float("inf")):
            element = tensor.view(-1)[tensor.numel() // 2]
            kept = element.item()
            with torch.no_grad():
                element.fill_(bad)
            with pytest.raises(TrainError, match="not finite"):
                t._check_weights()
            with torch.no_grad():
                element.fill_(kept)
    t._check_weights()


def test_momenta_made_before_the_first_step_give_torchs_lazy_updates(data, tmp_path):
    # A compiled run's trainer makes the momentum buffers (zeros) before any step,
    # outside what the compiled update captures; the updates must be those of torch's
    # SGD, which makes each buffer at the first step, bit for bit.
    t = trainer(data, tmp_path, epochs=1, compile=True)
    state = t.optimizer.state
    copies = {w: w.detach().clone().requires_grad_() for w in t.model.parameters()}
    assert all(torch.equal(state[w]["momentum_buffer"], torch.zeros_like(w)) for w in copies)
    lazy = torch.optim.SGD(
        [{**g, "params": [copies[w] for w in g["params"]]} for g in t.optimizer.param_groups]
    )
    assert not lazy.state
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for w, c in copies.items():
            w.grad = torch.randn(w.shape, generator=generator)
            c.grad = w.grad.clone()
        t.optimizer.step()
        lazy.step()
        for w, c in copies.items():
            assert torch.equal(w, c)
            assert torch.equal(state[w]["momentum_buffer"], lazy.state[c]["momentum_buffer"])


def test_a_diverging_run_stops_with_one_clear_line(data, tmp_path):
    t = trainer(data, tmp_path, epochs=1, lr=1e6)
    with pytest.raises(EveryRankError, match="training diverged; lower train.lr") as raised:
        t.run_epoch()
    assert "\n" not in str(raised.value)


def test_the_compiled_step_is_the_eager_step_up_to_rounding(data, tmp_path):
    # train.compile: the whole step compiled (inductor's C++ on a CPU). With inductor's
    # random ops replaced by eager's (`fallback_random`), dropout draws the eager masks,
    # so the run is the eager run up to float rounding, across a rate drop (the update's
    # rate is a constant in its graph: a drop must recompile it).
    import torch._dynamo
    import torch._inductor.config as inductor

    # Inductor's config is not among dynamo's guards: a step another test compiled in this
    # process (with inductor's own random numbers) would be reused. Compile afresh.
    torch._dynamo.reset()
    runs = {}
    for compiled in (False, True):
        t = trainer(
            data,
            tmp_path / str(compiled),
            epochs=2,
            batch_size=5,  # one batch shape: one graph to compile each way
            max_epochs_per_rate=1,
            **EPOCH_ENDS,
            compile=compiled,
        )
        start = {name: value.clone() for name, value in t.model.state_dict().items()}
        with inductor.patch(fallback_random=True):
            run_to_end(t)
        runs[compiled] = t
    eager, compiled = runs[False], runs[True]
    assert compiled.forward is not compiled._losses  # the compiled graphs ran
    assert [r["lr"] for r in compiled.history] == pytest.approx([0.01, 0.001])
    for got, expected in zip(timeless(compiled.history), timeless(eager.history), strict=True):
        for name in ("train_loss", "val_loss"):
            assert got[name] == pytest.approx(expected[name], rel=1e-4), name
    # The updates (weights less the initial ones; both runs start alike) within 2%: the
    # eager step itself in channels-last differs from the contiguous one by up to 0.8%
    # here (a few steps of sums in other orders); a missed rate drop or other dropout masks
    # change them by far more.
    assert_updates_within(compiled.model.state_dict(), eager.model.state_dict(), start, 2e-2)


def test_a_compiled_run_resumes_bit_for_bit(data, tmp_path):
    # Compiled, dropout draws inductor's random numbers: from each step's seed too, so a
    # run stopped and resumed (compiled again in a new trainer) ends as the whole run.
    compiled = {**TWO_EPOCHS, "batch_size": 5, "compile": True}
    whole = trainer(data, tmp_path / "whole", **compiled)
    run_to_end(whole)
    first = trainer(data, tmp_path, **compiled)
    stop_at(first, epoch=1, step=1)
    resumed = trainer(data, tmp_path, **compiled)
    assert resumed.resume() and (resumed.epoch, resumed.step) == (1, 1)
    run_to_end(resumed)
    assert_same_weights(whole.model.state_dict(), resumed.model.state_dict())
    assert timeless(resumed.history) == timeless(whole.history)


def test_an_eager_run_does_not_load_the_cuda_graph_machinery_nor_torchvision(tmp_path):
    # torch.compiler.cudagraph_mark_step_begin() looks light, but its first call loads
    # inductor's CUDA graph trees: 679 more modules, ~1.4 s in every training process.
    # Only `train.compile` needs it. Nor does a raw store need torchvision (its JPEG
    # decoder): importing it takes ~1.3 s, in the stage and in each loader worker.
    code = f"""
import sys
from pathlib import Path
import flows.evaluate, flows.train  # the stages' processes import these
from alexnet.train import Trainer
from tests.helpers import tiny_training_data, train_run
data = tiny_training_data(Path({str(tmp_path)!r}))
t = Trainer(train_run(data, data / "run", epochs=1, batch_size=5))
t.run_epoch()
print("torch._inductor.cudagraph_trees" in sys.modules, "torchvision" in sys.modules)
"""
    done = run_python(code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "False False"


@pytest.mark.parametrize("start", [(0, 0), (1, 2), (2, 3), (3, 0), (4, 1)])
def test_the_steps_are_every_epoch_and_step_from_the_start_to_the_budget(start):
    # Made when asked for (a list is 86 MB on ImageNet): the same keys as the list.
    epoch, step, epochs, steps = *start, 3, 4
    listed = [(e, s) for e in range(epoch, epochs) for s in range(step if e == epoch else 0, steps)]
    made = Steps(epoch, step, epochs, steps)
    assert list(made) == listed and len(made) == len(listed)


def test_a_jpeg_stores_batches_left_encoded_train_as_the_decoded_ones(tmp_path, monkeypatch):
    # On CUDA a jpeg store's batches reach the step encoded, to be decoded there (the step
    # once took their size before decoding them). The same path on the CPU, where the
    # decode is the loader's own libjpeg-turbo, must train exactly as decoded batches.
    from alexnet import train as train_module
    from alexnet.jpeg import Encoded

    jpeg_training_data(tmp_path)
    decoded = Trainer(train_run(tmp_path, tmp_path / "decoded", epochs=1)).run_epoch()
    monkeypatch.setattr(train_module, "encoded_for", lambda split, device, decoder: True)
    run = train_run(tmp_path, tmp_path / "encoded", epochs=1)
    images, _, size = next(Trainer(run).batches())  # what the loader hands the step
    assert isinstance(images, Encoded) and len(images.sizes) == size == 4
    encoded = Trainer(run).run_epoch()
    for name in ("train_loss", "train_top1_error", "val_loss", "val_top1_error"):
        assert encoded[name] == decoded[name], name
