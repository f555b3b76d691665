"""The worker check's own rules (alexnet/cluster.py, flows/cluster.py), without a
cluster: what a worker's answer is refused for, the marker's life. A real cluster's
workers are checked in tests/test_cluster.py, a LocalCluster's in tests/test_flows.py."""

from __future__ import annotations

import http.server
import re
import threading
from dataclasses import replace

import pytest

from alexnet.cluster import (
    MARKER,
    WorkerCheck,
    markers,
    problem,
    stage_view,
    worker_view,
)
from alexnet.errors import AlexnetError
from flows.cluster import check_reach, check_workers
from tests.helpers import DEAD_PID, free_port


def test_a_worker_that_sees_the_stages_files_and_runs_its_code_passes(tmp_path):
    (tmp_path / "raw").mkdir()
    with markers([str(tmp_path / "out")]) as tokens:  # not made yet: in its parent
        seen = worker_view(list(tokens), [str(tmp_path / "raw")])
        assert [path.rsplit("/", 1)[0] for path in tokens] == [str(tmp_path)]
    assert problem(seen, stage_view(tokens), ["alexnet/prepare.py"]) is None
    assert list(tmp_path.iterdir()) == [tmp_path / "raw"]  # the marker removed


def test_a_worker_with_other_library_versions_is_refused(tmp_path):
    stage = stage_view({})
    seen = replace(stage, versions={**stage.versions, "PIL": "9.5.0"})
    line = problem(seen, stage, [])
    assert line == (
        f"runs other libraries (PIL 9.5.0 where the stage has {stage.versions['PIL']}): "
        "install the stage's on the workers"
    )


def test_a_worker_whose_pil_lacks_a_codec_of_the_same_version_is_refused(monkeypatch):
    # pillow-simd built on a node without libwebp reports the stage's version: unchecked,
    # that worker skipped the WebP files of its shards, which the stage's PIL decodes.
    from PIL import features

    stage = stage_view({})
    built = [name for name in ("webp", "libtiff", "jpg") if features.check(name)]
    lacked = built[0]  # webp, or another codec this PIL has
    check = features.check
    monkeypatch.setattr(features, "check", lambda name: name != lacked and check(name))
    seen = worker_view([], [])
    assert seen.versions["PIL"] == stage.versions["PIL"]
    assert problem(seen, stage, []) == (
        f"runs other libraries (no PIL {lacked} where the stage has it): install the "
        "stage's on the workers"
    )


def test_a_worker_with_another_libjpeg_build_is_refused(monkeypatch):
    from PIL import features

    stage = stage_view({})
    builds = {"jpg": "9e", "libjpeg_turbo": "0.1"}  # versions the stage's has not
    monkeypatch.setattr(features, "version", builds.get)
    seen = worker_view([], [])
    jpeg, turbo = stage.versions["libjpeg"], stage.versions["libjpeg-turbo"]
    assert problem(seen, stage, []) == (
        f"runs other libraries (libjpeg 9e where the stage has {jpeg}, libjpeg-turbo 0.1 "
        f"where the stage has {turbo}): install the stage's on the workers"
    )


def test_a_worker_that_cannot_run_the_check_is_refused_in_one_line(tmp_path):
    class Client:  # a worker of an older checkout, without alexnet/cluster.py
        def run(self, function, *args, on_error):
            assert on_error == "return"
            return {"tcp://10.0.0.7:4312": ModuleNotFoundError("No module named 'alexnet.cluster'")}

    check = WorkerCheck("flows.synth", outputs=(str(tmp_path),), inputs=())
    with pytest.raises(AlexnetError) as refused:
        check_workers(Client(), check)
    assert str(refused.value) == (
        "compute.scheduler: Dask worker tcp://10.0.0.7:4312 cannot run the check "
        "(ModuleNotFoundError: No module named 'alexnet.cluster'): the workers need the "
        "stage's code and libraries"
    )


def test_a_killed_stages_marker_is_swept_by_the_next_check(tmp_path):
    left = tmp_path / f".{MARKER}.tmp-{DEAD_PID}"
    left.write_text("a killed stage's token")
    with markers([str(tmp_path)]):
        assert not left.exists()
    assert list(tmp_path.iterdir()) == []


class Worker:  # a cluster of one worker, which runs what it is sent here
    def run(self, function, *args, on_error):
        assert on_error == "return"
        return {"tcp://10.0.0.7:4312": function(*args)}


def repoint(link, target) -> None:
    link.unlink()
    link.symlink_to(target)


def test_a_worker_whose_output_path_leads_elsewhere_is_refused(tmp_path):
    # The stage's output is a link to the shared folder; on the worker's machine the
    # same path is a folder of its own disk, where the tasks would write the shards.
    # The marker was written where the link points and read there: the worker passed.
    shared, local, out = tmp_path / "shared", tmp_path / "local", tmp_path / "prepared"
    shared.mkdir()
    local.mkdir()
    out.symlink_to(shared)

    class OtherNode:  # the worker runs with `out` leading to its own folder
        def run(self, function, *args, on_error):
            repoint(out, local)
            try:
                return {"tcp://10.0.0.7:4312": function(*args)}
            finally:
                repoint(out, shared)

    check = WorkerCheck("flows.prepare", outputs=(str(out),), inputs=())
    with pytest.raises(AlexnetError) as refused:
        check_workers(OtherNode(), check)
    assert re.fullmatch(
        rf"compute\.scheduler: Dask worker tcp://10\.0\.0\.7:4312 does not see {out} "
        rf"\(no file \.{MARKER}\.tmp-[^ ]+ there\): the workers need the same file system "
        "at the same paths",
        str(refused.value),
    )
    assert list(shared.iterdir()) == [] and list(local.iterdir()) == []  # the marker removed


def test_a_worker_that_cannot_reach_the_prefect_api_is_refused_in_one_line():
    # A temporary Prefect server listens on 127.0.0.1: a worker on another machine finds
    # nothing there, and its tasks could not report their runs.
    url = f"http://127.0.0.1:{free_port()}/api"
    with pytest.raises(AlexnetError) as refused:
        check_reach(Worker(), url)
    line = str(refused.value)
    worker = "compute.scheduler: Dask worker tcp://10.0.0.7:4312"
    assert line.startswith(f"{worker} cannot reach the Prefect API at {url} (")
    assert line.endswith(
        "): start a server the workers reach (`prefect server start --host 0.0.0.0`) "
        "and set PREFECT_API_URL to its address"
    )
    assert "\n" not in line


def test_a_worker_that_reaches_the_prefect_api_passes():
    class Answering(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the name http.server calls)
            self.send_response(404)  # any HTTP answer: a server is there
            self.end_headers()

        def log_message(self, *args):
            pass

    with http.server.HTTPServer(("127.0.0.1", 0), Answering) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        check_reach(Worker(), f"http://127.0.0.1:{server.server_port}/api")
        server.shutdown()


def test_a_scheduler_without_workers_is_refused_in_one_line(monkeypatch, tmp_path):
    # Every check asks each worker: with none they all passed, and the stage's tasks
    # waited for a worker for ever.
    from distributed import LocalCluster

    import flows.cluster

    monkeypatch.setattr(flows.cluster, "WORKER_WAIT_S", 1.0)
    check = WorkerCheck("flows.prepare", outputs=(str(tmp_path / "out"),), inputs=())
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as cluster:
        address = cluster.scheduler_address
        with pytest.raises(AlexnetError) as refused:
            flows.cluster.check_cluster(address, check, "http://127.0.0.1:9/api")
    assert str(refused.value) == (
        f"compute.scheduler: the Dask scheduler at {address} has no workers (waited 1 s): "
        f"start them (`dask worker {address}` on each machine; an adaptive cluster needs a "
        "minimum of one, which the checks run on)"
    )
    assert list(tmp_path.iterdir()) == []
