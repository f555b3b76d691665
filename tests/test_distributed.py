"""Data parallelism: torchrun with 2 gloo processes trains the weights one process
trains with the same global batch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alexnet.distributed import PATIENCE, World
from alexnet.errors import Interrupted
from alexnet.params import TrainParams
from alexnet.train import (
    AFRESH,
    RESUMES,
    EveryRankError,
    Trainer,
    TrainError,
    TrainRun,
    disagreement,
    load_history,
    start_view,
)
from flows.train import STOP_GRACE_S, _launch, torchrun_command, worker_environment
from tests.helpers import EPOCH_ENDS, EVERY_STEP, REPO, free_port, train_run

# torchrun as flows/train.py runs it (`torchrun_command`)
TORCHRUN = [sys.executable, "-m", "alexnet.distributed", "--standalone"]


def two_epochs(data, folder: Path, **train) -> TrainRun:
    # batch 3 over 10 images: steps of 3, 3, 3, 1, so rank 1 also gets an empty share.
    options = {"epochs": 2, "batch_size": 3, "val_batch_size": 3, **EPOCH_ENDS}
    return train_run(data, folder, {"dropout": 0.0}, **{**options, **train})


@pytest.mark.long
def test_two_gloo_processes_train_the_weights_of_one(data, tmp_path):
    one = Trainer(two_epochs(data, tmp_path / "one"))
    while not one.finished():
        one.run_epoch()

    run = two_epochs(data, tmp_path / "two", nproc_per_node=2)
    command = torchrun_command(run.train, run.model_dump_json())
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    two = torch.load(run.model_path, weights_only=True)
    for name, value in one.weights().items():
        # Equal up to float rounding (all-reduce vs one sum, kernels blocked for 3 vs 2
        # images), which 20 steps amplify to <= 1.5e-5 (weights up to 0.05); a rank
        # training on its half alone, or an unscaled loss, is ~1e-3 off.
        torch.testing.assert_close(two["state_dict"][name], value, rtol=1e-3, atol=5e-5, msg=name)
    for a, b in zip(one.history, load_history(run.checkpoint), strict=True):
        assert a["val_top1_error"] == b["val_top1_error"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert (run.metrics / "train.json").exists()


@pytest.mark.long
def test_a_checkpoint_in_use_stops_every_rank_in_one_line(data, tmp_path):
    # rank 0 alone takes the checkpoint's lock: refused, it ended, and the other ranks
    # waited for it in their first collective
    from alexnet.train import sole_writer

    run = two_epochs(data, tmp_path, nproc_per_node=2)
    command = torchrun_command(run.train, run.model_dump_json())
    with sole_writer(run.checkpoint):  # another training's, running
        started = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 1 and time.monotonic() - started < 60
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {run.checkpoint}: another training is using this checkpoint now "
        f"({run.checkpoint}.lock is locked); wait for it to end, or give this one another "
        "--checkpoint"
    ], done.stderr[-2000:]
    assert not run.checkpoint.exists()


def test_one_process_world_is_inert():
    world = World.from_env(["cpu"])
    assert (world.rank, world.size, world.main) == (0, 1, True)
    assert world.sum([1.0, 2.0]) == [1.0, 2.0] and list(range(5)[world.rows]) == [0, 1, 2, 3, 4]
    assert world.device(["cuda"]) == ["cuda"] and world.device(("cpu", "cpu")) == ["cpu", "cpu"]


class ThreadRank(World):
    """A rank in a thread: its patient barrier is a `threading.Barrier` of the ranks."""

    def wait_for_all(self) -> None:
        self.patient.wait(timeout=30)


def test_a_nodes_ranks_hash_the_data_once(tmp_path, monkeypatch):
    # A node's 8 ranks each read ImageNet's LMDB whole for its digest, at once (~2 TB of
    # reads for a raw store): the node's first rank hashes, the others find its memo.
    import threading

    from alexnet import digests

    path, memo = tmp_path / "data.mdb", tmp_path / "memo.json"
    path.write_bytes(b"the store")
    hashed, real = [], digests.sha16

    def slow_sha16(file):  # long enough for every rank to be hashing at once
        hashed.append(file)
        time.sleep(0.3)
        return real(file)

    monkeypatch.setattr(digests, "sha16", slow_sha16)
    barrier, found = threading.Barrier(3), {}

    def rank(local: int) -> None:
        world = ThreadRank(local, 3, local, barrier)
        found[local] = world.node_first(lambda: digests.file_digest(path, memo))

    threads = [threading.Thread(target=rank, args=(local,)) for local in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert found == {local: real(path) for local in range(3)} and len(hashed) == 1


def test_ranks_that_would_start_elsewhere_are_told_apart():
    code = {"alexnet/train.py": "ab" * 8}
    start = start_view(RESUMES, 2, 7, "f" * 64, code)
    assert disagreement([start, list(start)]) is None
    assert disagreement([start]) is None
    fresh = start_view(AFRESH, 0, 0, "f" * 64, code)
    stale = start_view(RESUMES, 1, 7, "f" * 64, code)  # an older copy of the checkpoint
    other = start_view(RESUMES, 2, 7, "f" * 64, {"alexnet/train.py": "cd" * 8})
    said = disagreement([start, start, fresh, stale, other])
    assert said.startswith("the ranks do not agree where training starts: rank 0 resumes ")
    assert "rank 2 starts afresh" in said and "(2 more ranks differ)" in said
    assert "\n" not in said
    assert "rank 1 resumes epoch 3, step 7 (run fffffffffffffff, code" in disagreement(
        [other, start]
    )


class WithAFreshPeer(World):
    """A one-process world whose gather adds a rank that found no checkpoint."""

    def gather(self, values):
        return [list(values), start_view(AFRESH, 0, 0, "0" * 64, {})]


def test_a_rank_resuming_alone_stops_instead_of_hanging(data, tmp_path):
    trainer = Trainer(train_run(data, tmp_path, epochs=1), WithAFreshPeer())
    assert not trainer.checkpoint.exists()
    with pytest.raises(EveryRankError, match=r"ckpt.pt: the ranks do not agree .* rank 1 starts"):
        trainer.resume()  # neither resumes, but the peer's run differs
    trainer.save()
    with pytest.raises(EveryRankError, match=r"rank 0 resumes epoch 1, step 0 .* rank 1 starts"):
        trainer.resume()


class WithAResumingPeer(World):
    """A one-process world whose gather adds a rank that resumed where this one would."""

    def gather(self, values):
        return [list(values), [RESUMES, *values[1:]]]


def test_a_rank_that_cannot_read_the_checkpoint_stops_every_rank(data, tmp_path, monkeypatch):
    # An I/O error on one node (a stale NFS handle) is raised by every rank, after they
    # compare: raised by that rank alone, its peers waited in the gather for an hour.
    import errno

    trainer = Trainer(train_run(data, tmp_path, epochs=1), WithAResumingPeer())
    trainer.save()

    def unreadable(*args, **kwargs):
        raise OSError(errno.ESTALE, "Stale file handle")

    monkeypatch.setattr(torch, "load", unreadable)
    with pytest.raises(
        EveryRankError, match=r"ckpt.pt: .* rank 0 cannot read it .* rank 1 resumes"
    ):
        trainer.resume()
    assert trainer.checkpoint.exists()


def test_each_rank_gets_its_own_devices():
    rank1 = World(rank=1, size=2, local_rank=1)
    assert rank1.device(["cuda"]) == ["cuda:1"]
    assert rank1.device(["cuda:0", "cuda:1"]) == ["cuda:2", "cuda:3"]  # DDP x two columns
    assert rank1.device(["cpu"]) == ["cpu"]
    assert World().device(["cuda:0", "cuda:1"]) == ["cuda:0", "cuda:1"]
    assert rank1.device(("cuda:0", "cuda:1")) == ["cuda:2", "cuda:3"]  # TrainParams' tuple


@pytest.mark.parametrize(
    ("device", "bound"),
    [(["cuda"], "cuda:1"), (["cuda:0", "cuda:1"], "cuda:2")],
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
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(d))))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(dist, "init_process_group", lambda b: calls.append(("init", b)))
    monkeypatch.setattr(
        dist, "new_group", lambda backend, timeout: calls.append(("group", backend, timeout))
    )
    world = World.from_env(device)
    # and a gloo group whose barrier waits hours for the ranks still hashing their data
    # (NCCL's collectives time out after 10 minutes)
    patient = ("group", "gloo", PATIENCE)
    assert calls == [("set_device", bound), ("init", "nccl"), patient] and world.rank == 1
    calls.clear()
    World.from_env(["cpu"])
    assert calls == [("init", "gloo"), patient]


@pytest.mark.parametrize(("gpus", "message"), [(0, "CUDA is not available"), (1, "has 1 CUDA")])
def test_a_rank_without_its_gpu_is_one_line_before_it_joins(gpus, message, monkeypatch):
    # nproc_per_node beyond the node's GPUs, or no driver: torch's set_device raised a
    # traceback on every rank
    import torch.distributed as dist

    from alexnet.placement import DeviceError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(dist, "init_process_group", lambda b: pytest.fail("joined"))
    with pytest.raises(DeviceError, match=message):
        World.from_env(["cuda"])


def test_a_device_list_in_params_means_two_columns(data, tmp_path):
    for written in ("cuda:0,cuda:1", "cuda:0, cuda:1", ["cuda:0", "cuda:1"]):
        assert TrainParams(device=written).device == ("cuda:0", "cuda:1")
    assert TrainParams(device="cpu").device == ("cpu",) == TrainParams().device
    # torchrun ranks receive the run as JSON and validate it again: the list survives.
    run = train_run(data, tmp_path, device="cpu,cpu")
    assert TrainRun.model_validate_json(run.model_dump_json()) == run
    assert run.train.device == ("cpu", "cpu")


def test_a_two_column_run_resumes_bit_for_bit_and_its_model_file_predicts(data, tmp_path):
    # The paper's model parallelism on two "devices" (both the CPU: the split path).
    from alexnet.evaluate import crop_log_probabilities
    from alexnet.modelfile import load_model
    from alexnet.placement import TwoColumnAlexNet
    from alexnet.predict import load_file, predict
    from tests.helpers import jpeg

    def two_columns(name: str) -> Trainer:
        run = train_run(data, tmp_path / name, epochs=1, batch_size=5, device=["cpu", "cpu"])
        return Trainer(run)

    whole = two_columns("whole")
    assert isinstance(whole.model, TwoColumnAlexNet)
    whole.save = lambda: None  # its checkpoints are not what is tested
    while not whole.finished():
        whole.run_epoch()

    first = two_columns("stopped")

    def stop(step, total):
        first.stop_requested = True  # what the SIGTERM handler does, after step 1

    with pytest.raises(Interrupted):
        first.run_epoch(on_step=stop)
    resumed = two_columns("stopped")
    assert resumed.resume() and (resumed.epoch, resumed.step) == (0, 1)
    while not resumed.finished():
        resumed.run_epoch()
    weights = whole.weights()
    assert weights.keys() == resumed.weights().keys()
    for name, value in resumed.weights().items():
        assert torch.equal(value, weights[name]), name
    assert resumed.history[0]["val_loss"] == whole.history[0]["val_loss"]

    path = tmp_path / "alexnet.pt"
    resumed.export(path)
    model, payload = load_model(path)
    assert model.columns == 2 and payload["classes"] == whole.classes
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    (tmp_path / "image.jpg").write_bytes(jpeg(300, 260, seed=5))
    [prediction] = predict([tmp_path / "image.jpg"], path, top=2, device="cpu")
    assert prediction.error is None and len(prediction.top) == 2
    # The file's one-device network predicts what the trained two-column one computes.
    image = load_file(tmp_path / "image.jpg", payload["prepare"])[None]
    resumed.model.eval()
    placed = crop_log_probabilities(resumed.model, image, payload["mean"], 224).exp().mean(1)[0]
    for entry in prediction.top:
        assert entry["probability"] == pytest.approx(float(placed[entry["index"]]), abs=1e-5)


@pytest.mark.long
def test_two_torchrun_nodes_train_the_weights_of_one_and_resume_after_a_kill(data, tmp_path):
    # Two nodes (two torchrun agents, one process each) meeting at a c10d rendezvous on
    # this machine, as `alexnet train` on each node with `nnodes: 2` runs them. By its
    # name: params refuse a loopback endpoint on several nodes (the name resolves to it).
    import socket

    import psutil

    one = Trainer(two_epochs(data, tmp_path / "one"))
    while not one.finished():
        one.run_epoch()

    def nodes(run: TrainRun) -> list[subprocess.Popen]:
        command = torchrun_command(run.train, run.model_dump_json())
        return [
            subprocess.Popen(
                command,
                cwd=Path(__file__).parents[1],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(2)
        ]

    def two_nodes(port: int) -> TrainRun:
        return two_epochs(
            data,
            tmp_path / "two",
            nnodes=2,
            rdzv_endpoint=f"{socket.gethostname()}:{port}",
            **EVERY_STEP,
        )

    first = nodes(two_nodes(free_port()))
    run = two_nodes(0)
    deadline = time.monotonic() + 240
    while not run.checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert run.checkpoint.exists(), "no checkpoint from the first run"
    # kill -9 the training process of one node (its torchrun agent's child)
    (worker,) = [c for c in psutil.Process(first[1].pid).children() if "alexnet.fit" in c.cmdline()]
    worker.kill()
    for node in first:
        node.communicate(timeout=240)
    assert any(node.returncode != 0 for node in first)
    stopped = torch.load(run.checkpoint, weights_only=True)

    again = nodes(two_nodes(free_port()))
    outputs = [node.communicate(timeout=300)[0] for node in again]
    for node, output in zip(again, outputs, strict=True):
        assert node.returncode == 0, output[-3000:]
    assert any(f"resuming from {run.checkpoint}" in output for output in outputs)
    two = torch.load(run.model_path, weights_only=True)
    for name, value in one.weights().items():
        torch.testing.assert_close(two["state_dict"][name], value, rtol=1e-3, atol=5e-5, msg=name)
    assert stopped["epoch"] < 2  # killed before the end


STOPPING_WORKER = """
import os, signal, sys, time
from pathlib import Path
folder, seconds = Path(sys.argv[1]), float(sys.argv[2])
def stop(signum, frame):
    time.sleep(seconds)  # a checkpoint being written
    (folder / f"saved-{os.environ['RANK']}").write_text("")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
(folder / f"started-{os.environ['RANK']}").write_text("")
time.sleep(600)
"""


ORPHANED_WORKER = """
import os, signal, sys, time
from pathlib import Path
from alexnet.fit import follow_launcher
folder = Path(sys.argv[1])
def stop(signum, frame):
    (folder / f"saved-{os.environ['RANK']}").write_text("")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
assert follow_launcher()
(folder / f"started-{os.environ['RANK']}").write_text(str(os.getpid()))
time.sleep(600)
"""


@pytest.mark.long
def test_workers_whose_torchrun_is_killed_stop_as_on_sigterm(tmp_path):
    # torchrun starts its workers in sessions of their own: a SIGKILL to the stage's
    # group (a stop's grace run out) killed torchrun and left them training on, orphaned.
    script = tmp_path / "worker.py"
    script.write_text(ORPHANED_WORKER)
    torchrun = subprocess.Popen([*TORCHRUN, "--nproc-per-node", "2", str(script), str(tmp_path)])
    started = []
    try:
        deadline = time.monotonic() + 120
        while len(started) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            started = [path.read_text() for path in tmp_path.glob("started-*")]
        assert len(started) == 2 and all(started), "the workers did not start"
        assert not list(tmp_path.glob("saved-*"))  # stopped by the kill, not before it
        torchrun.kill()
        torchrun.wait()
        deadline = time.monotonic() + 30
        while len(list(tmp_path.glob("saved-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(path.name for path in tmp_path.glob("saved-*")) == ["saved-0", "saved-1"]
    finally:
        torchrun.kill()
        for pid in started:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def test_a_worker_ctrl_c_reaches_ends_it_quietly(monkeypatch, capsys):
    # torchrun passes a Ctrl-C on to its workers: each printed a KeyboardInterrupt
    # traceback after the stage's own one line
    from types import SimpleNamespace

    import alexnet.fit as module

    run = SimpleNamespace(train=SimpleNamespace(device=("cpu",)))
    monkeypatch.setattr(module, "follow_launcher", lambda: True)
    monkeypatch.setattr(module, "configure", lambda: None)
    monkeypatch.setattr(module.TrainRun, "model_validate_json", lambda text: run)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "fit", interrupted)
    assert module.main(["{}"]) == 130
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize(
    ("local_rank", "error", "said"),
    [
        ("0", EveryRankError("the loss became nan"), "error: the loss became nan\n"),
        ("1", EveryRankError("the loss became nan"), ""),
        ("1", TrainError("no images"), "error: rank 3: no images\n"),
    ],
)
def test_an_error_every_rank_raises_is_said_once_a_node(
    monkeypatch, capsys, local_rank, error, said
):
    # a NaN loss stops every rank alike (a sum over the ranks): each of a node's 8 ranks
    # printed the same line
    from types import SimpleNamespace

    import alexnet.fit as module

    run = SimpleNamespace(train=SimpleNamespace(device=("cpu",)))
    monkeypatch.setattr(module, "follow_launcher", lambda: True)
    monkeypatch.setattr(module, "configure", lambda: None)
    monkeypatch.setattr(module.TrainRun, "model_validate_json", lambda text: run)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", local_rank)

    def fails(*args):
        raise error

    monkeypatch.setattr(module, "fit", fails)
    assert module.main(["{}"]) == 1
    assert capsys.readouterr() == ("", said)


STOPPING_LAUNCHER = """
import os, signal, sys, time
from pathlib import Path
folder = Path(sys.argv[1])
def stop(signum, frame):
    time.sleep(1)  # its workers stopping
    (folder / "ended").write_text("")
    sys.exit(1)
signal.signal(signal.SIGINT, stop)
(folder / "pid").write_text(str(os.getpid()))
time.sleep(60)
"""


@pytest.mark.parametrize("torchrun_too", [True, False])
def test_ctrl_c_waits_for_torchrun_to_stop_its_workers(tmp_path, monkeypatch, torchrun_too):
    # A terminal's Ctrl-C reaches the stage and torchrun (one process group): the stage
    # returned at once, while torchrun still stopped its workers on the GPUs the next run
    # needs. A SIGINT to the stage alone is passed on to torchrun.
    import threading

    import flows.train

    monkeypatch.setattr(flows.train, "CTRL_C_WAIT_S", 2)
    assert threading.current_thread() is threading.main_thread()  # where signals land
    script = tmp_path / "torchrun.py"
    script.write_text(STOPPING_LAUNCHER)

    def ctrl_c() -> None:
        deadline = time.monotonic() + 60
        pid = tmp_path / "pid"
        while not (pid.exists() and pid.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        if torchrun_too:
            os.kill(int(pid.read_text()), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    # Python's own Ctrl-C, as a terminal's command has it: a shell that starts a command
    # in the background (`pytest ... &`) starts it with SIGINT ignored, and Python then
    # installs no handler of its own.
    interrupts = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=ctrl_c, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            _launch([sys.executable, str(script), str(tmp_path)])
    finally:
        signal.signal(signal.SIGINT, interrupts)
    assert (tmp_path / "ended").exists()


def sigterm_during(command: list[str], started: Path) -> None:
    """`_launch(command)`, sent SIGTERM once its two workers wrote `started-*` in `started`."""
    import threading

    assert threading.current_thread() is threading.main_thread()  # where signals land
    launched = threading.Event()

    def terminate_once_started() -> None:
        deadline = time.monotonic() + 120
        while len(list(started.glob("started-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        if not launched.is_set():  # _launch still waits (and handles the signal)
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_once_started, daemon=True).start()
    try:
        _launch(command)
    finally:
        launched.set()


@pytest.mark.long
@pytest.mark.parametrize(("grace", "saved"), [(2, []), (20, ["saved-0", "saved-1"])])
def test_a_sigterm_to_a_torchrun_stage_stops_it_after_the_workers_grace(
    tmp_path, monkeypatch, grace, saved
):
    # torchrun exits with 1 on a SIGTERM (a failure, as the stage read it), and kills its
    # workers 30 s after passing the signal on unless told otherwise: the stage gives them
    # STOP_GRACE_S (5 minutes), here shortened. Workers that take 6 s to checkpoint.
    import flows.train

    assert STOP_GRACE_S >= 300
    monkeypatch.setattr(flows.train, "STOP_GRACE_S", grace)
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    script = tmp_path / "worker.py"
    script.write_text(STOPPING_WORKER)
    command = [*TORCHRUN]
    command += ["--nproc-per-node", "2", str(script), str(tmp_path), "6"]
    with pytest.raises(Interrupted, match="stopped by SIGTERM"):
        sigterm_during(command, tmp_path)
    assert sorted(path.name for path in tmp_path.glob("saved-*")) == saved


def test_each_torchrun_worker_gets_its_share_of_the_cores(tmp_path, monkeypatch):
    # torchrun sets OMP_NUM_THREADS=1 where it is unset: 2 CPU ranks on 6 cores used 2
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("alexnet.runtime.cores", lambda: 6)
    script = tmp_path / "threads.py"
    script.write_text(
        "import os, sys, torch\n"
        "rank = os.environ['RANK']\n"
        "open(os.path.join(sys.argv[1], rank), 'w').write(str(torch.get_num_threads()))\n"
    )
    command = [*TORCHRUN]
    command += ["--nproc-per-node", "2", str(script), str(tmp_path)]
    _launch(command, worker_environment(TrainParams(nproc_per_node=2)))
    assert [(tmp_path / rank).read_text() for rank in "01"] == ["3", "3"]
    # one the user set is kept
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _launch(command, worker_environment(TrainParams(nproc_per_node=2)))
    assert [(tmp_path / rank).read_text() for rank in "01"] == ["1", "1"]


FAILING_WORKER = """
import os, signal, sys, time
if os.environ["RANK"] == "1":
    if sys.argv[1] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    print("error: rank 1: the reason", file=sys.stderr)
    sys.exit(1)
time.sleep(60)
"""


@pytest.mark.parametrize(
    ("how", "line"),
    [("exit", "error: rank 1: the reason"), ("kill", "error: rank 1 was killed by SIGKILL")],
)
def test_a_failed_rank_is_one_line_not_torchruns_traceback(tmp_path, how, line):
    # torchrun printed a ~35-line ChildFailedError traceback and report after the rank's
    # own error line; a rank killed by a signal, which says nothing itself, is named
    assert torchrun_command(TrainParams(), "RUN")[1:4] == TORCHRUN[1:]
    script = tmp_path / "worker.py"
    script.write_text(FAILING_WORKER)
    command = [*TORCHRUN, "--nproc-per-node", "2", str(script), how]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 1
    assert line in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "FAILED" not in done.stderr, done.stderr[-3000:]


def test_a_node_alone_at_the_rendezvous_is_one_error_line(tmp_path):
    # `nnodes: 2` and the other node never started (or another rdzv_endpoint): torchrun
    # gave up with RendezvousTimeoutError's traceback, which has no message, and the
    # stage then blamed "the worker's error", though no worker had started.
    endpoint = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "alexnet.distributed", "--nnodes", "2"]
    command += ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint]
    command += ["--rdzv-conf", "join_timeout=2", "-m", "json.tool", os.devnull]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: the rendezvous at {endpoint} did not gather its 2 nodes in time: start "
        "`alexnet train` on every node, all with this train.rdzv_endpoint"
    )


def test_a_rendezvous_no_node_hosts_is_one_error_line_without_cpp_frames(capfd):
    # An endpoint nothing answers at (TEST-NET-1): torchrun printed the store's retries,
    # each with ~30 lines of C++ frames, then "(... See inner exception for details.)"
    command = [sys.executable, "-m", "alexnet.distributed", "--rdzv-backend", "c10d"]
    command += ["--rdzv-endpoint", "192.0.2.2:29400", "--rdzv-conf", "read_timeout=2"]
    command += ["--nnodes", "2", "--nproc-per-node", "1", "-m", "alexnet.fit", "{}"]
    with pytest.raises(TrainError, match=r"torchrun exited with status 1"):
        _launch(command)
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines[:8]
    assert lines[0].startswith("error: the rendezvous at 192.0.2.2:29400 failed (")
    assert lines[0].endswith(
        "): train.rdzv_endpoint must name a training node that every node reaches"
    )
    assert "inner exception" not in lines[0]


def test_torchruns_workers_keep_their_cpp_logs(tmp_path, monkeypatch):
    # torchrun's own C++ logs are left out (flows.train.QUIET_AGENT), not its workers'
    monkeypatch.delenv("TORCH_CPP_LOG_LEVEL", raising=False)
    script = tmp_path / "level.py"
    script.write_text(
        "import os, sys\n"
        "level = os.environ.get('TORCH_CPP_LOG_LEVEL', 'unset')\n"
        "open(os.path.join(sys.argv[1], os.environ['RANK']), 'w').write(level)\n"
    )
    _launch([*TORCHRUN, "--nproc-per-node", "1", str(script), str(tmp_path)])
    assert (tmp_path / "0").read_text() == "unset"
    monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", "INFO")  # one the user set: everyone's
    _launch([*TORCHRUN, "--nproc-per-node", "1", str(script), str(tmp_path)])
    assert (tmp_path / "0").read_text() == "INFO"
