"""`dvc repro` as the deployments run it (alexnet/repro.py), on a two-stage DVC project
of shell commands: what `force` re-runs, the line a failure is reported with, a stopped
run that leaves no stage behind, and the remote another clone pulls from."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from alexnet.repro import (
    STAGES,
    WORKER_SCRATCH_SUFFIX,
    ReproError,
    _cause,
    chain,
    check_remote_kept,
    default_remote,
    push_outputs,
    remote_url,
    repro,
    repro_args,
    status_clean,
)
from flows.pipeline import _warn_if_checkpoint_goes, lateness

pytestmark = pytest.mark.usefixtures("own_temporary_folder")

GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]


# Stage `a` writes out/a; `b` copies it to out/b. Each appends its name to ../runs.log
# (outside the project: DVC does not track it), so a test sees which commands ran.
def dvc_yaml(a: str) -> str:
    b = "cp out/a out/b && echo b >> ../runs.log"
    stages = {
        "a": {"cmd": a, "deps": ["input"], "outs": ["out/a"]},  # no deps: no run cache
        "b": {"cmd": b, "deps": ["out/a"], "outs": ["out/b"]},
    }
    return yaml.safe_dump({"stages": stages})


def dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True
    )


def project(root: Path, a: str = "mkdir -p out && echo a > out/a && echo a >> ../runs.log"):
    """A git + DVC project at root/project whose default remote is root/remote."""
    repo = root / "project"
    repo.mkdir(parents=True)
    (repo / "dvc.yaml").write_text(dvc_yaml(a))
    (repo / "input").write_text("input\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    assert dvc("init", "-q", cwd=repo).returncode == 0
    assert dvc("remote", "add", "-d", "shared", "../remote", cwd=repo).returncode == 0
    subprocess.run([*GIT, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-qm", "project"], cwd=repo, check=True)
    return repo


def runs(repo: Path) -> list[str]:
    log = repo.parent / "runs.log"
    return log.read_text().split() if log.exists() else []


def test_force_on_a_stage_reruns_it_alone_and_on_the_chain_all_of_it(tmp_path):
    repo = project(tmp_path)
    assert repro(repo, log=lambda line: None) == ["a", "b"]
    assert repro(repo, "b", log=lambda line: None) == []  # up to date
    assert repro(repo, "b", force=True, single=True, log=lambda line: None) == ["b"]
    assert repro(repo, "b", force=True, log=lambda line: None) == ["a", "b"]
    assert runs(repo) == ["a", "b", "b", "a", "b"]
    assert repro_args("b", force=True, single=True) == ["repro", "--force", "--single-item", "b"]
    assert repro_args(None, force=True, single=True) == ["repro", "--force"]


def test_a_failure_is_reported_with_the_line_that_says_why(tmp_path):
    repo = project(tmp_path, a="echo 'error: raw folder data/raw does not exist' && exit 1")
    with pytest.raises(ReproError, match=r"failed in .*: error: raw folder data/raw does not"):
        repro(repo, log=lambda line: None)
    # Without a stage's own line, DVC's ERROR line, not its last (a hint), is the cause.
    assert _cause("ERROR: failed to reproduce 'a': is busy", "") == (
        "ERROR: failed to reproduce 'a': is busy"
    )
    assert _cause("ERROR: a later one", "ERROR: the first") == "ERROR: the first"
    assert _cause("error: the stage's own", "ERROR: dvc's") == "error: the stage's own"
    # Neither (DVC on an invalid dvc.yaml): the last lines, together.
    (repo / "dvc.yaml").write_text("stages:\n  a:\n    cmd: echo a: b\n")
    with pytest.raises(ReproError, match=r"dvc.yaml' is invalid\. \| Mapping values"):
        repro(repo, log=lambda line: None)


def test_a_second_repro_on_the_repository_waits_for_the_first(tmp_path):
    # DVC's lock would fail it: each guard holds the repository's leftovers lock until
    # its tree has ended (a stopped run's, until the workers it left have checkpointed,
    # which may be after Prefect let go of that run's turn)
    repo = project(tmp_path, a="sleep 3 && mkdir -p out && echo a > out/a")
    first = threading.Thread(target=repro, args=(repo,), kwargs={"log": lambda line: None})
    first.start()
    deadline = time.monotonic() + 30
    while not (repo / ".dvc" / "tmp" / "rwlock").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines: list[str] = []
    assert repro(repo, log=lines.append) == []  # after the first: up to date
    assert (
        lines[0]
        == "waiting for an earlier run on this repository (or what a stopped one left) to end"
    )
    assert (repo / "out" / "b").exists()
    first.join()


def stage_started(folder: Path, timeout: float = 120) -> int:
    """The pid of the sleeping stage once it runs (it writes ../stage.pid)."""
    pid_file = folder / "stage.pid"
    deadline = time.monotonic() + timeout
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return int(pid_file.read_text())


def test_stopping_the_caller_stops_the_stage_dvc_started(tmp_path):
    # The stage ignores nothing and sleeps; the caller is stopped as Prefect stops a
    # cancelled run: SIGTERM, which its engine turns into an exception in the flow.
    stage = "mkdir -p out && echo $$ > ../stage.pid && sleep 600 && echo a > out/a"
    repo = project(tmp_path, a=stage)
    caller = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import signal, sys
                from pathlib import Path
                from alexnet.repro import repro
                signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
                repro(Path({str(repo)!r}), log=lambda line: None)
                """
            ),
        ],
        cwd=Path(__file__).resolve().parents[1],
    )
    stage_pid = stage_started(tmp_path)
    caller.send_signal(signal.SIGTERM)
    assert caller.wait(timeout=60) == 143
    with pytest.raises(ProcessLookupError):
        os.kill(stage_pid, 0)  # gone, not orphaned and still writing
    assert not (repo / "out" / "a").exists()


# A stage that, like torchrun, runs its worker in a session of its own (out of reach of
# the group's signals), passes a SIGTERM on to it and exits without waiting: the worker
# takes 3 s to checkpoint.
STAGE_WITH_A_WORKER = (
    "mkdir -p out && "
    'setsid sh -c \'trap "sleep 3; echo saved > ../saved; exit 0" TERM; '
    "echo $$ > ../worker.pid; while :; do sleep 0.1; done' & "
    "while [ ! -s ../worker.pid ]; do sleep 0.1; done; "
    "trap 'kill -TERM $(cat ../worker.pid); exit 143' TERM; "
    "echo $$ > ../stage.pid; while :; do sleep 0.1; done"
)


def test_a_stop_waits_for_a_worker_the_stage_left_in_a_session_of_its_own(tmp_path):
    # torchrun's workers run in sessions of their own: a stop that ended with the stage's
    # group let the next run take the turn while they still wrote the checkpoint
    repo = project(tmp_path, a=STAGE_WITH_A_WORKER)
    code = (
        "import signal, sys; from pathlib import Path; from alexnet.repro import repro\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # as Prefect's engine\n"
        f"repro(Path({str(repo)!r}), log=lambda line: None)"
    )
    caller = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[1])
    stage_started(tmp_path)
    worker = int((tmp_path / "worker.pid").read_text())
    assert os.getsid(worker) == worker  # (out of the group's reach)
    caller.send_signal(signal.SIGTERM)
    caller.wait(timeout=60)
    assert (tmp_path / "saved").read_text() == "saved\n"  # before the turn ended
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)


def test_the_wait_for_left_workers_ends_them_at_its_limit():
    # in a process of its own: it reaps (and kills) every child of the process it is in
    code = textwrap.dedent(
        """
        import subprocess, sys, time
        from alexnet.orphans import wait_for_children
        stuck = subprocess.Popen(["sleep", "60"])
        start = time.monotonic()
        wait_for_children(0.5)
        print(time.monotonic() - start < 10, stuck.poll() is not None)  # not its 60 s
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True
    )
    assert done.stdout.split() == ["True", "True"], done.stderr


def test_a_caller_killed_outright_still_takes_its_stage_with_it(tmp_path):
    # SIGKILL (or the OOM killer) runs no handler in the caller: the guard that leads
    # dvc's process group learns of its death from the kernel and stops the group.
    stage = "mkdir -p out && echo $$ > ../stage.pid && sleep 600 && echo a > out/a"
    repo = project(tmp_path, a=stage)
    code = f"from pathlib import Path; from alexnet.repro import repro; repro(Path({str(repo)!r}))"
    caller = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[1])
    stage_pid = stage_started(tmp_path)
    group = os.getpgid(stage_pid)  # the shell's and its sleep's
    caller.kill()
    caller.wait()
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            os.kill(stage_pid, 0)  # raises once the stage is gone
            time.sleep(0.2)
        raise AssertionError("the stage outlived its killed caller by 30 s")
    except ProcessLookupError:
        pass
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)  # an orphan of a failed check: not left behind
    assert not (repo / "out" / "a").exists()


def test_cancelling_a_pipeline_run_stops_its_stage(tmp_path, prefect_server):
    # As the UI's Cancel does it: the runner sends the flow's process SIGTERM. The stage
    # runs in a task; its `dvc repro` must be stopped there (it runs in a session of its
    # own), not left orphaned and writing while the next run takes the turn.
    stage = "mkdir -p out && echo $$ > ../stage.pid && sleep 600 && echo a > out/a"
    repo = project(tmp_path, a=stage)
    code = (
        f"from flows.pipeline import pipeline_flow; pipeline_flow(repo={str(repo)!r}, push=False)"
    )
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    caller = subprocess.Popen(
        [sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env
    )
    stage_pid = stage_started(tmp_path)
    caller.send_signal(signal.SIGTERM)
    try:
        caller.wait(timeout=60)
        with pytest.raises(ProcessLookupError):
            os.kill(stage_pid, 0)  # gone with the run
    finally:
        caller.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(stage_pid, signal.SIGKILL)  # an orphan of a failed check: not left behind
    assert not (repo / "out" / "a").exists()


def test_a_retrain_whose_turn_comes_too_late_does_nothing(tmp_path, prefect_server):
    # Behind a long run (here: the repository's turn held for 6 s), a scheduled retrain
    # waits; when its turn comes more than late_after_minutes (3 s) after its scheduled
    # time, it skips instead of running the chain again, late.
    from prefect.concurrency.sync import concurrency

    from alexnet.repro import repository_key, repository_limit
    from flows.pipeline import retrain_flow

    repo = project(tmp_path)
    assert retrain_flow(late_after_minutes=1, push=False, repo=str(repo))["ran"] == ["a", "b"]
    (repo / "input").write_text("new data\n")  # so a run that is not skipped runs a
    holding, release = threading.Event(), threading.Event()

    def long_run() -> None:
        limit = repository_limit(repository_key(repo.resolve()))
        with concurrency(limit, occupy=1, strict=True):
            holding.set()
            release.wait(60)

    other = threading.Thread(target=long_run)
    other.start()
    assert holding.wait(30)
    threading.Timer(6, release.set).start()
    late = retrain_flow(late_after_minutes=0.05, push=False, repo=str(repo))
    other.join()
    assert late == {"ran": [], "metrics": {}, "pushed": False, "skipped": True}
    on_time = retrain_flow(late_after_minutes=0.05, push=False, repo=str(repo))
    assert on_time["ran"] == ["a"]  # (b's input, out/a, is the same bytes)


def test_a_failed_renewal_of_the_turn_warns_and_the_run_goes_on(
    tmp_path, prefect_server, monkeypatch, caplog
):
    # An API outage while a run holds its turn (the lease renewal fails after its retries)
    # must not cancel a chain hours into train: Prefect says so and the body goes on.
    from prefect import flow
    from prefect.client.orchestration import SyncPrefectClient

    from flows.pipeline import one_run_at_a_time

    def outage(self, **lease) -> None:
        raise ConnectionError("the API is down")

    monkeypatch.setattr(SyncPrefectClient, "renew_concurrency_lease", outage)

    @flow
    def holding_the_turn() -> str:
        with one_run_at_a_time(tmp_path):
            renewing = [t for t in threading.enumerate() if "lease-renewal" in t.name]
            assert renewing, "no lease renewal thread: Prefect renamed it?"
            for thread in renewing:
                thread.join(30)  # its retries over, the failure handled
            for _ in range(50):  # a cancellation is injected at a next instruction
                time.sleep(0.01)
        return "finished"

    with caplog.at_level("WARNING", logger="prefect"):
        assert holding_the_turn() == "finished"
    assert "lease renewal failed" in caplog.text


def test_a_second_clone_pulls_the_outputs_and_restores_stages_from_the_run_cache(tmp_path):
    repo = project(tmp_path)
    assert repro(repo, log=lambda line: None) == ["a", "b"]
    logged = []
    assert push_outputs(repo, default_remote(repo), logged.append)
    assert (tmp_path / "remote").is_dir()  # made by the first push
    # A clone at the commit before dvc.lock: `dvc repro --pull` finds both stages in the
    # pushed run cache and restores their outputs without running them.
    before_lock = tmp_path / "before-lock"
    subprocess.run(["git", "clone", "-q", str(repo), str(before_lock)], check=True)
    restored = dvc("repro", "--pull", cwd=before_lock)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert runs(repo) == ["a", "b"]  # no stage ran again
    assert (before_lock / "out" / "b").read_text() == "a\n"
    # A clone of the commit with dvc.lock: `dvc pull` brings back every output.
    subprocess.run([*GIT, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-qm", "run"], cwd=repo, check=True)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    assert dvc("pull", cwd=clone).returncode == 0
    assert (clone / "out" / "b").read_text() == "a\n" and status_clean(clone)


def test_status_waits_for_the_lock_a_terminals_dvc_holds(tmp_path):
    import threading

    import zc.lockfile

    repo = project(tmp_path)
    (repo / ".dvc" / "tmp").mkdir(exist_ok=True)
    held = zc.lockfile.LockFile(str(repo / ".dvc" / "tmp" / "lock"))
    threading.Timer(4.0, held.close).start()  # longer than DVC's own 3 s of retries
    assert status_clean(repo) is False  # (stages not run yet), not a failure
    with pytest.raises(ReproError, match=r"dvc status failed in .*: './dvc.yaml' is invalid\.$"):
        (repo / "dvc.yaml").write_text("stages: [")
        status_clean(repo)


def test_a_push_to_a_remote_inside_a_workers_temporary_folder_is_refused(tmp_path, monkeypatch):
    # A Prefect process worker clones into tempfile.TemporaryDirectory(suffix="prefect"):
    # the default remote, a folder beside the repository, would be deleted with it.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    scratch = tmp_path / f"tmpab12{WORKER_SCRATCH_SUFFIX}"
    repo = project(scratch)
    url = remote_url(repo, "shared")
    assert url == str(scratch / "remote")  # as DVC resolves `../remote`
    with pytest.raises(ReproError, match=rf"^DVC remote 'shared' \({url}\) is inside this run's"):
        check_remote_kept(repo, "shared", url)
    check_remote_kept(repo, "shared", "s3://bucket/alexnet")  # shared storage: kept
    check_remote_kept(repo, "shared", str(tmp_path / "kept"))  # outside the run's folder
    check_remote_kept(project(tmp_path / "mine"), "shared", str(tmp_path / "mine" / "remote"))


def test_a_train_checkpoint_inside_a_workers_temporary_folder_is_warned_of(tmp_path, monkeypatch):
    # The run still works; a cancelled training would start afresh on the next run.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("ALEXNET_CHECKPOINT", raising=False)
    clone = tmp_path / f"tmpab12{WORKER_SCRATCH_SUFFIX}" / "alexnet"
    clone.mkdir(parents=True)
    warned = []
    _warn_if_checkpoint_goes(clone, warned.append)  # the default, in the clone
    assert len(warned) == 1, warned
    assert warned[0].startswith(f"train's checkpoint {clone / 'models/checkpoints/train.pt'} ")
    assert "set ALEXNET_CHECKPOINT on the workers" in warned[0]
    monkeypatch.setenv("ALEXNET_CHECKPOINT", "kept/train.pt")  # relative: in the clone too
    _warn_if_checkpoint_goes(clone, warned.append)
    assert len(warned) == 2
    monkeypatch.setenv("ALEXNET_CHECKPOINT", str(tmp_path / "kept" / "train.pt"))
    _warn_if_checkpoint_goes(clone, warned.append)  # outside the run's folder: kept
    monkeypatch.delenv("ALEXNET_CHECKPOINT")
    (tmp_path / "mine").mkdir()
    _warn_if_checkpoint_goes(tmp_path / "mine", warned.append)  # one's own checkout
    assert len(warned) == 2


def test_no_remote_means_nothing_pushed_with_a_line_saying_so(tmp_path):
    repo = project(tmp_path)
    assert dvc("remote", "default", "--unset", cwd=repo).returncode == 0
    logged = []
    assert not push_outputs(repo, default_remote(repo), logged.append)
    assert logged == ["no default DVC remote (dvc remote add -d): nothing pushed"]


def test_the_chain_is_dvc_yamls_stages_in_order_up_to_what_a_stage_needs(tmp_path):
    repo = project(tmp_path)
    assert chain(repo) == ["a", "b"] and chain(repo, "a") == ["a"]
    with pytest.raises(ReproError, match="no stage 'c'"):
        chain(repo, "c")
    main = Path(__file__).resolve().parents[1]
    assert chain(main) == list(STAGES)  # the pipeline's own dvc.yaml: the six, in order
    # What `dvc repro pack` would consider: not stats, which pack does not read (nor,
    # with the ImageNet preset's raw folder, synth; that is DVC's graph, not a list here).
    assert chain(main, "pack") == ["synth", "prepare", "pack"]
    assert chain(main, "evaluate") == list(STAGES)  # the demo's prepare reads synth's data


def test_lateness_of_a_scheduled_run():
    now = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)
    assert lateness(now - timedelta(minutes=90), now) == timedelta(minutes=90)
    assert lateness(now + timedelta(seconds=5), now) == timedelta(0)  # clocks differ
    assert lateness(None, now) == timedelta(0)


def test_a_stage_run_is_planned_with_conflicts_retried(monkeypatch):
    # The parent task run reaches the server's tables from its events, after a delay;
    # creating its child before then is a 409, which the client must retry, not raise.
    from types import SimpleNamespace

    from prefect.settings import PREFECT_CLIENT_RETRY_EXTRA_CODES

    from flows import pipeline

    retried = []

    class Client:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def create_flow_run(self, flow, parent_task_run_id):
            retried.append(409 in PREFECT_CLIENT_RETRY_EXTRA_CODES.value())
            assert parent_task_run_id == "parent"
            return SimpleNamespace(id="child")

    task_run = SimpleNamespace(task_run=SimpleNamespace(id="parent"))
    monkeypatch.setattr(pipeline, "get_client", lambda sync_client: Client())
    monkeypatch.setattr(pipeline.TaskRunContext, "get", lambda: task_run)
    assert pipeline._plan_stage_run("train") == "child"
    assert retried == [True]
    assert 409 not in PREFECT_CLIENT_RETRY_EXTRA_CODES.value()  # for this call only
