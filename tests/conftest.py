"""Shared fixtures: one Prefect test server, a tiny LMDB training set. Helpers that
tests call are in tests/helpers.py."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from pathlib import Path

# OpenMP's threads sleep when a parallel region ends rather than spin for the next:
# the suite runs two workers and their commands on two cores, where libgomp's spinning
# took ~8% of all CPU time. (Read when libgomp loads: the workers and commands started
# from here have it; nothing computed changes.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# DVC starts an analytics daemon after each command run where no config turns it off (the
# tests' own repositories, before their first config): 55 of them cost 35 s of CPU.
os.environ["DVC_NO_ANALYTICS"] = "1"
# No network here: the tests' Prefect servers' telemetry would only log its failure.
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# A Prefect home of the tests' own, before Prefect is imported: the flow runs of the
# commands they start without a server (each starts Prefect's temporary one) stay out of
# the user's ~/.prefect (their UI's runs; and a profile there may point at a Prefect
# Cloud workspace). One per process of the session, so that xdist's workers never
# create one database at once; removed when the process exits.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="alexnet-tests-prefect-")

import pytest
import torch

from alexnet.runtime import configure, cores
from tests.helpers import SHARDS, TINY, tiny_training_data

atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], True)
configure()  # as every entry point does
# A GPU node's (README, "More machines"): the tests' training runs would all share it.
os.environ.pop("ALEXNET_CHECKPOINT", None)


# Set by pytest for each test, and by inductor and Triton at their first compile or first
# look at their cache (for themselves; the cache folder is their default, the one a child
# process would pick; the assembler is the one Triton ships).
LIBRARIES_OWN = {
    "PYTEST_CURRENT_TEST",
    "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR",
    "TORCHINDUCTOR_CACHE_DIR",
    "TRITON_CACHE_DIR",
    "TRITON_PTXAS_PATH",
}


def torch_settings() -> dict:
    """The process-wide torch settings that change what a computation gives."""
    return {
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "dtype": torch.get_default_dtype(),
    }


# The tests' folders go to memory where it has this much room: the training tests
# write 0.5-1.5 GB of checkpoints each, and on a VM's disk the kernel's copy into the
# page cache cost ~6x a tmpfs's (a 1 GB write: 2.6 s of CPU against 0.4 s here); here
# the suite's CPU time fell 15% (1,728 s to 1,478 s). Elsewhere (a small /dev/shm, as
# in Docker) pytest's default.
MEMORY_FOLDER, MEMORY_NEEDED = Path("/dev/shm"), 8 << 30


# The xdist controller's Prefect server, which its workers' `prefect_server` use: one
# for the run rather than one a worker (each ~20 s of CPU to start, and ~1.5 s a minute
# idle, on this 2-core VM). The controller outlives the workers: xdist stops each as
# soon as its queue is empty.
SHARED_SERVER = "ALEXNET_TESTS_PREFECT_API"
SERVER_START_S = 120


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("numprocesses", None) and not hasattr(config, "workerinput"):
        from flows.server import TemporaryServer

        server = TemporaryServer()
        server.launch()  # answering by the time a worker's first test asks (it waits)
        os.environ[SHARED_SERVER] = server.api_url  # before the workers start
        config.add_cleanup(server.stop)
    temporary_folders_in_memory(config)


def temporary_folders_in_memory(config: pytest.Config) -> None:
    if config.option.basetemp or "PYTEST_DEBUG_TEMPROOT" in os.environ:
        return  # the user's choice
    try:
        room = os.statvfs(MEMORY_FOLDER)
    except OSError:
        return
    if room.f_bavail * room.f_frsize >= MEMORY_NEEDED and os.access(MEMORY_FOLDER, os.W_OK):
        # pytest's own variable for the root of its folders (xdist's workers get theirs
        # under the controller's)
        os.environ["PYTEST_DEBUG_TEMPROOT"] = str(MEMORY_FOLDER)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto`: one worker more than the cores (pyproject caps it at 4). About a quarter
    of the suite's time its tests wait on their commands (servers starting, runs polled,
    a stage's start-up): on 2 cores, 3 workers ran it in 10:00 against 2 workers' 11:37.
    (`-n logical` and PYTEST_XDIST_AUTO_NUM_WORKERS: xdist's own answer, None here.)"""
    if config.option.numprocesses == "logical" or os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    return cores() + 1


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The `long` tests first (the rest in their order): xdist's workers then share out
    the short ones at the end, rather than one waiting while the other runs a long one."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


@pytest.fixture(autouse=True)
def environment_kept():
    """Each test leaves this process's environment and torch settings as it found them:
    the commands later tests start inherit the one, the runs later tests compare bit for
    bit compute with the other. (distributed once wrote OMP_NUM_THREADS=1 here, and a
    train command then computed other bits than the same run in this process.)"""
    before, settings = dict(os.environ), torch_settings()
    yield
    names = (set(before) | set(os.environ)) - LIBRARIES_OWN
    changed = sorted(name for name in names if before.get(name) != os.environ.get(name))
    assert not changed, f"the test changed the environment: {changed}"
    assert torch_settings() == settings, "the test changed torch's settings"


@pytest.fixture
def own_temporary_folder(tmp_path, monkeypatch):
    """TMPDIR of the test's own for the commands it starts. The guards' lock of a
    repository's runs (`alexnet.repro.leftovers_lock`) lies there and is named after the
    repository's origin, which every clone of this repository shares: the tests of two
    xdist workers would wait for each other's runs (and leave a lock file in /tmp each)."""
    tempfile.gettempdir()  # this process's, chosen (and kept) before: not the test's
    monkeypatch.setenv("TMPDIR", str(tmp_path))


@pytest.fixture(scope="session")
def prefect_server():
    """The session's Prefect server: the xdist controller's (`pytest_configure`), or
    this process's own, started here, without xdist. Each process's tests and the
    commands they start report to it (`flows.server.api_at`)."""
    from flows.server import TemporaryServer, api_at, unreachable

    url, server = os.environ.get(SHARED_SERVER), None
    if url is None:
        server = TemporaryServer()
        server.start(timeout=SERVER_START_S)  # (returns once it answers)
        url = server.api_url
    else:  # the controller's, which may still be starting
        deadline = time.monotonic() + SERVER_START_S
        while (why := unreachable(url)) is not None:
            assert time.monotonic() < deadline, f"the session's Prefect server: {why}"
            time.sleep(0.5)
    try:
        with api_at(url):
            yield url
    finally:
        if server is not None:
            server.stop()


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """lmdb/{train,val} and stats/ of two classes of 256x256 blobs (10 + 4 images)."""
    return tiny_training_data(tmp_path_factory.mktemp("train-data"))


# `raw` and `reference` are read, never written: one each for a process's session, not
# for each module (their tests span two, which xdist's workers share out).
@pytest.fixture(scope="session")
def raw(tmp_path_factory, prefect_server) -> Path:
    """The demo dataset, drawn by the synth flow on a 2-process pool."""
    from flows.runners import task_runner
    from flows.synth import synth_flow

    out = tmp_path_factory.mktemp("synth") / "raw"
    result = synth_flow.with_options(task_runner=task_runner(None, 2))(str(out), TINY)
    assert result == {"images": 3 * 6 + 3 * 2, "oddities": 6, "path": str(out)}
    return out


@pytest.fixture(scope="session")
def reference(raw, tmp_path_factory) -> tuple[Path, dict]:
    """prepare on one worker: what every other way of running must reproduce bit for bit."""
    from flows.prepare import prepare_flow
    from flows.runners import task_runner

    out = tmp_path_factory.mktemp("prep") / "one"
    counts = prepare_flow.with_options(task_runner=task_runner(None, 1))(str(raw), str(out), SHARDS)
    return out, counts
