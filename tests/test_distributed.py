"""Data parallelism: torchrun with 2 gloo processes trains the weights one process
trains with the same global batch."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from alexnet.distributed import World
from alexnet.fit import spec
from alexnet.params import TrainParams
from alexnet.train import TrainConfig, Trainer
from flows.train import torchrun_command


def config(**options) -> TrainConfig:
    # batch 3 over 10 images: steps of 3, 3, 3, 1, so rank 1 also gets an empty share.
    return TrainConfig(
        epochs=2,
        batch_size=3,
        val_batch_size=3,
        checkpoint_every=100,
        model={"init": "caffe", "dropout": 0.0},
        **options,
    )


def test_two_gloo_processes_train_the_weights_of_one(data, tmp_path):  # noqa: F811
    one = Trainer(config(), data / "train", data / "val", data / "stats", tmp_path / "1.pt")
    while not one.finished():
        one.run_epoch()

    (tmp_path / "lmdb").mkdir()
    for split in ("train", "val"):
        (tmp_path / "lmdb" / split).symlink_to(data / split)
    model_path = tmp_path / "two" / "alexnet.pt"
    argument = spec(
        config(),
        tmp_path / "lmdb",
        data / "stats",
        model_path,
        tmp_path / "2.pt",
        tmp_path / "metrics",
    )
    command = torchrun_command(TrainParams(nproc_per_node=2), argument)
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    two = torch.load(model_path, weights_only=True)
    for name, value in one.weights().items():
        # Equal up to float rounding (all-reduce vs one sum, kernels blocked for 3 vs 2
        # images), which 20 steps amplify to <= 1.5e-5 (weights up to 0.05); a rank
        # training on its half alone, or an unscaled loss, is ~1e-3 off.
        torch.testing.assert_close(two["state_dict"][name], value, rtol=1e-3, atol=5e-5, msg=name)
    for a, b in zip(one.history, two["history"], strict=True):
        assert a["val_top1_error"] == b["val_top1_error"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert (tmp_path / "metrics" / "train.json").exists()


def test_one_process_world_is_inert():
    world = World.from_env("cpu")
    assert (world.rank, world.size, world.main) == (0, 1, True)
    assert world.sum([1.0, 2.0]) == [1.0, 2.0] and list(range(5)[world.rows]) == [0, 1, 2, 3, 4]
    assert world.device("cuda") == "cuda"


def test_each_rank_gets_its_own_devices():
    rank1 = World(rank=1, size=2, local_rank=1)
    assert rank1.device("cuda") == "cuda:1"
    assert rank1.device("cuda:0,cuda:1") == "cuda:2,cuda:3"  # DDP x two-device columns
    assert rank1.device("cuda:0,cpu") == "cuda:1,cpu"  # one GPU per rank: no gaps
    assert World(rank=3, size=4, local_rank=1).device("cpu,cuda:1") == "cpu,cuda:2"
    assert rank1.device("cpu") == "cpu" and World().device("cuda:0,cuda:1") == "cuda:0,cuda:1"


@pytest.mark.parametrize(
    ("device", "bound"), [("cuda", "cuda:1"), ("cuda:0,cuda:1", "cuda:2"), ("cuda:0,cpu", "cuda:1")]
)
def test_an_nccl_rank_binds_its_own_gpu_before_joining(device, bound, monkeypatch):
    # No GPUs here: the calls are recorded. Unbound, every rank of a node would run its
    # NCCL collectives on cuda:0.
    import torch.distributed as dist

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(dist, "init_process_group", lambda b: calls.append(("init", b)))
    world = World.from_env(device)
    assert calls == [("set_device", bound), ("init", "nccl")] and world.rank == 1
    calls.clear()
    World.from_env("cpu")
    assert calls == [("init", "gloo")]


def test_a_device_list_in_params_means_two_columns():
    from alexnet.params import ModelParams
    from flows.train import _config

    params = TrainParams(device=["cuda:0", "cuda:1"])
    assert _config(params, ModelParams()).device == "cuda:0,cuda:1"
