"""The data stages on a real Dask cluster: a `dask scheduler` and two `dask worker`
processes started on their own (as on a team's nodes, here on 127.0.0.1), reached by
address, the workers in a folder of their own. prepare, stats and pack through it give
the bytes of the process pool; a stage command's relative paths reach the right files;
a stage refuses, before any work, workers that see other files at its paths or run
other code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from prefect import flow

import alexnet.cluster
from alexnet.cluster import WorkerCheck
from alexnet.errors import AlexnetError
from alexnet.params import ComputeParams, PackParams, Params, PrepareParams, with_compute
from flows.cluster import check_cluster
from flows.pack import pack_flow
from flows.prepare import prepare_flow
from flows.runners import task_runner
from flows.stages import STAGES, run_stage
from flows.stats import stats_flow
from tests.helpers import REPO, SHARDS, free_port, shard_bytes

pytestmark = pytest.mark.usefixtures("prefect_server")


def start(*command: str, cwd=REPO) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *command],
        cwd=cwd,
        # the session's Prefect API (the tasks report to it), the code wherever they run
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


@pytest.fixture(scope="module")
def workers_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("workers")


@pytest.fixture(scope="module")
def cluster(workers_folder):
    """tcp://127.0.0.1:PORT of a scheduler with two single-threaded workers, started in
    a folder that is not the repository's (as on another node)."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    processes = [
        start(
            "distributed.cli.dask_scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-address",
            ":0",
        ),
    ]
    processes += [
        start(
            "distributed.cli.dask_worker",
            address,
            "--nthreads",
            "1",
            "--nworkers",
            "1",
            "--dashboard-address",
            ":0",
            "--name",
            f"node{i}",
            cwd=workers_folder,
        )
        for i in range(2)
    ]
    try:
        from distributed import Client

        deadline = time.monotonic() + 120
        while True:
            try:
                with Client(address, timeout=10) as client:
                    client.wait_for_workers(2, timeout=60)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield address
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def test_prepare_stats_and_pack_on_a_cluster_give_the_process_pools_bytes(
    raw, reference, cluster, tmp_path
):
    out = tmp_path / "prepared"
    prepare_flow.with_options(task_runner=task_runner(cluster, 2))(str(raw), str(out), SHARDS)
    assert shard_bytes(out) == shard_bytes(reference[0])
    assert (out / "report.json").read_bytes() == (reference[0] / "report.json").read_bytes()

    compute = ComputeParams(workers=2, window_mb=4)
    results = {}
    for name, runner in (("pool", task_runner(None, 2)), ("cluster", task_runner(cluster, 2))):
        stats_flow.with_options(task_runner=runner)(
            str(out / "train"), str(tmp_path / name / "stats"), PrepareParams(), compute
        )
        pack_flow.with_options(task_runner=runner)(
            str(out), str(tmp_path / name / "lmdb"), PackParams(batch=4), PrepareParams(), compute
        )
        results[name] = {
            p.relative_to(tmp_path / name).as_posix(): p.read_bytes()
            for p in sorted((tmp_path / name).rglob("*"))
            if p.is_file() and p.name != "lock.mdb"
        }
    assert sorted(results["pool"]) == sorted(results["cluster"])
    assert "lmdb/train/data.mdb" in results["pool"] and "stats/mean.npy" in results["pool"]
    assert results["pool"] == results["cluster"]


def test_a_stage_commands_relative_paths_reach_the_same_files_on_the_workers(
    cluster, workers_folder, tmp_path
):
    # The command runs in tmp_path, the workers in a folder of their own: a relative
    # output path handed to them as it was would put the images in their folder.
    (tmp_path / "params.yaml").write_text(
        "synth:\n  classes: 2\n  train_per_class: 2\n  val_per_class: 1\n  oddities: 0\n"
    )
    command = [sys.executable, "-m", "flows.cli", "synth", "raw", "--scheduler", cluster]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    images = sorted(p.relative_to(tmp_path / "raw") for p in (tmp_path / "raw").rglob("*.JPEG"))
    assert len(images) == 2 * (2 + 1) and not list(workers_folder.rglob("*.JPEG"))


# Each process's own working folder: at this one absolute path the stage (here, in the
# test's folder) and the workers (in theirs) find different files, as a worker on a
# machine without the shared file system does at the stage's paths.
OWN_FOLDER = "/proc/self/cwd"
ADDRESS = r"compute\.scheduler: Dask worker tcp://127\.0\.0\.1:\d+"
SAME_FILES = "the workers need the same file system at the same paths"


NEVER_STARTED = object()  # a flow that fails if it is used at all


def on_cluster(cluster: str) -> Params:
    return with_compute(Params(prepare=SHARDS), scheduler=cluster, workers=2)


def test_workers_that_see_other_files_at_the_output_path_are_refused_before_any_work(
    raw, cluster, workers_folder, tmp_path, monkeypatch
):
    # Unchecked, the workers wrote the shards into their own folder, and prepare
    # reported success over a prepared folder without them.
    monkeypatch.chdir(tmp_path)
    paths = {"raw": str(raw), "out": f"{OWN_FOLDER}/prepared"}
    expected = (
        rf"^{ADDRESS} does not see {OWN_FOLDER} \(no file \.alexnet-check\.tmp-\w+-\d+ there\)"
    )
    with pytest.raises(AlexnetError, match=rf"{expected}: {SAME_FILES}$"):
        # before the flow is even given its runner: no flow run left Running on a server
        run_stage(STAGES["prepare"], paths, on_cluster(cluster), flow=NEVER_STARTED)
    assert not (tmp_path / "prepared").exists() and not (workers_folder / "prepared").exists()
    assert list(tmp_path.iterdir()) == []  # the marker removed


def test_workers_that_do_not_see_the_input_path_are_refused_before_any_work(
    reference, cluster, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train").symlink_to(reference[0] / "train")  # here, not for the workers
    paths = {"train": f"{OWN_FOLDER}/train", "out": str(tmp_path / "stats")}
    expected = rf"^{ADDRESS} does not see {OWN_FOLDER}/train \(no such file or folder there\)"
    with pytest.raises(AlexnetError, match=rf"{expected}: {SAME_FILES}$"):
        run_stage(STAGES["stats"], paths, on_cluster(cluster))
    assert not (tmp_path / "stats").exists()


def test_workers_that_imported_other_code_are_refused_before_any_work(
    raw, cluster, tmp_path, monkeypatch
):
    # The stage's code changed after the workers imported theirs (or they run another
    # checkout): unchecked, they made the shards with their code and DVC recorded this.
    monkeypatch.setitem(alexnet.cluster.IMPORTED_CODE, "alexnet/prepare.py", "0" * 16)
    paths = {"raw": str(raw), "out": str(tmp_path / "prepared")}
    expected = (
        r"runs other code \(alexnet/prepare\.py differs; restart the workers after a change\)"
    )
    with pytest.raises(AlexnetError, match=rf"^{ADDRESS} {expected}$"):
        run_stage(STAGES["prepare"], paths, on_cluster(cluster))
    assert list(tmp_path.iterdir()) == []


def test_workers_that_cannot_reach_the_prefect_api_are_refused(cluster, tmp_path):
    # As a worker on another machine finds nothing at a temporary server's 127.0.0.1
    # (the stage's own runs on a cluster check the session's server: they pass).
    url = f"http://127.0.0.1:{free_port()}/api"
    check = WorkerCheck("flows.prepare", outputs=(str(tmp_path / "prepared"),), inputs=())
    with pytest.raises(AlexnetError, match=rf"^{ADDRESS} cannot reach the Prefect API at "):
        check_cluster(cluster, check, url)
    assert list(tmp_path.iterdir()) == []


def test_a_running_cluster_with_a_temporary_prefect_server_is_refused(raw, tmp_path, monkeypatch):
    # A worker keeps the Prefect API it first reported to: the next stage on the same
    # cluster reported its task runs to the last stage's stopped temporary server (0
    # recorded). Refused before a server starts; a cluster of the stage's own is fine.
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.runners import check_lasting_api

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    paths = {"raw": str(raw), "out": str(tmp_path / "prepared")}
    address = "tcp://127.0.0.1:8786"
    monkeypatch.setattr("flows.runners.check_scheduler", lambda scheduler: None)  # none there
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(AlexnetError, match=r"^compute\.scheduler: the Dask cluster at "):
            run_stage(STAGES["prepare"], paths, on_cluster(address), flow=NEVER_STARTED)
    assert list(tmp_path.iterdir()) == []
    for scheduler in (None, "local"):
        check_lasting_api(scheduler, None)
    check_lasting_api(address, "http://10.0.0.1:4200/api")


@flow
def workers_given(raw: str, out: str, prepare: PrepareParams, compute: ComputeParams) -> int:
    return compute.workers


def test_no_worker_count_on_a_running_cluster_is_the_clusters_threads(raw, cluster, tmp_path):
    # 0 workers was this machine's core count: prepare kept 4 shards a core in flight, and
    # a cluster of 32 workers sat mostly idle
    paths = {"raw": str(raw), "out": str(tmp_path / "prepared")}
    params = with_compute(Params(prepare=SHARDS), scheduler=cluster, workers=0)
    assert run_stage(STAGES["prepare"], paths, params, flow=workers_given) == 2  # 2 x 1 thread
    given = with_compute(params, workers=5)
    assert run_stage(STAGES["prepare"], paths, given, flow=workers_given) == 5  # as given
