"""Running the chain through DVC, for the Prefect deployments (flows/pipeline.py).

Every run started from the Prefect UI or a schedule is `dvc repro`, so `dvc.lock` stays
the truth: after it, `dvc status` is clean, and a run with nothing changed does nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import yaml

from alexnet.errors import AlexnetError

Stage = Literal["synth", "prepare", "stats", "pack", "train", "evaluate"]
STAGES: tuple[str, ...] = Stage.__args__  # the chain's order

_RUNNING = re.compile(r"Running stage '([\w-]+)'")
RESTORED = re.compile(r"Stage '([\w-]+)' is cached")  # from the run cache, not run


class ReproError(AlexnetError):
    """`dvc repro` failed; the message ends with the line that says why."""


def repository_key(repo: Path) -> str:
    """What identifies the repository: its git `origin`, so that a worker's clone and the
    checkout `alexnet serve` runs in are one; else its path."""
    done = subprocess.run(
        ["git", "remote", "get-url", "origin"], cwd=repo, capture_output=True, text=True
    )
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else str(repo)


def repository_limit(key: str) -> str:
    """The name of the concurrency limit that the runs on the repository `key` share."""
    return f"dvc-repro-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def leftovers_lock(repo: Path) -> Path:
    """The file each `alexnet.guard` of the repository's runs holds locked while it runs
    and until what a stop left of its tree has ended (this machine's runs; named as
    their turn is)."""
    name = repository_limit(repository_key(repo))
    return Path(tempfile.gettempdir()) / f"alexnet-{name}.lock"


def _dvc(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def stage_environment() -> dict[str, str]:
    """The stages' `python -m flows.<stage>` commands must be this environment's, even when it is
    not activated (a Prefect worker, `.venv/bin/python -m ...`): its bin/ goes first."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}


def chain(repo: Path, until: str | None = None) -> list[str]:
    """The stages `dvc repro [until]` considers, in the file order of the repository's
    dvc.yaml (each after the stages it depends on, as the file is written): all of
    them, or `until` and the stages it depends on, as DVC's graph says (with the
    ImageNet preset, prepare reads no output of synth, so `stage/prepare` skips it)."""
    stages = list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])
    if until is None:
        return stages
    if until not in stages:
        raise ReproError(f"no stage {until!r} in {repo / 'dvc.yaml'}")
    from dvc.repo import Repo  # here: the rest of this module only starts dvc commands

    with Repo(str(repo)) as dvc:  # (a target names its file: DVC reads a bare name from the cwd)
        needed = {s.name for s in dvc.stage.collect(f"{repo / 'dvc.yaml'}:{until}", with_deps=True)}
    return [stage for stage in stages if stage in needed]


def repro_args(
    target: str | None = None, force: bool = False, single: bool = False, pull: bool = False
) -> list[str]:
    """`dvc repro`'s arguments. `force` alone regenerates every stage up to `target`;
    with `single` (DVC's `--single-item`) only `target` runs, its inputs taken as they are.
    `pull` fetches missing inputs from the remote and restores a stage the remote's run
    cache has seen instead of running it (what is in neither is run)."""
    flags = ["--force"] * force + ["--single-item"] * (single and target is not None)
    return ["repro", *flags, *["--pull"] * pull, *([target] if target else [])]


def repro(
    repo: Path,
    target: str | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
    single: bool = False,
    pull: bool = False,
    env: dict[str, str] | None = None,
) -> list[str]:
    """`dvc repro` (`repro_args`) in `repo`, its output passed to `log` line by line;
    returns the stages that ran (none when everything was up to date). If the caller is
    stopped (an exception: Prefect turns a cancellation's SIGTERM into one), the whole
    process tree of `dvc repro` is stopped with it, so no stage keeps writing outputs;
    if it is killed outright, `alexnet.guard`, which starts dvc, stops the tree."""
    guard = [sys.executable, "-m", "alexnet.guard", str(os.getpid())]
    process = subprocess.Popen(
        [*guard, *_dvc(repro_args(target, force, single, pull))],
        cwd=repo,
        stdout=subprocess.PIPE,
        env={**stage_environment(), **(env or {})},
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,  # a terminal's Ctrl-C is for this process, not the guard
    )
    ran, cause = [], ""
    last: deque[str] = deque(maxlen=3)  # DVC's own errors (an invalid dvc.yaml) span lines
    try:
        for line in process.stdout:
            line = line.rstrip()
            if line:
                log(line)
                last.append(" ".join(line.split()))
            cause = _cause(line, cause)
            if match := _RUNNING.search(line):
                ran.append(match.group(1))
        code = process.wait()
    except BaseException:
        process.terminate()  # the guard stops dvc's tree (its STOP_GRACE_S at most), then ends
        process.wait()
        raise
    if code != 0:
        where = " ".join(f"dvc repro {target or ''} failed in {repo}:".split())
        raise ReproError(f"{where} {cause or ' | '.join(last)}")
    return ran


def _cause(line: str, cause: str) -> str:
    """The line that says why a run failed: a stage's own one-line error (the alexnet
    CLI's `error:`) first, else DVC's first `ERROR:` (its last line is often a hint)."""
    if line.startswith("error:"):
        return line
    if line.startswith("ERROR:") and not cause:
        return line
    return cause


def _dvc_error(stderr: str) -> str:
    """DVC's `ERROR:` line, else its first line (an invalid dvc.yaml has no `ERROR:`)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return next((line for line in lines if line.startswith("ERROR")), lines[0] if lines else "")


def default_remote(repo: Path) -> str | None:
    """The name of the repository's default DVC remote, if it has one."""
    done = subprocess.run(
        _dvc(["remote", "default"]),
        cwd=repo,
        capture_output=True,
        text=True,
        env=stage_environment(),
    )
    return (done.stdout.strip() or None) if done.returncode == 0 else None


# A Prefect process worker without a `working_dir` runs each flow in a folder of
# `tempfile.TemporaryDirectory(suffix="prefect")`, deleted after the run.
WORKER_SCRATCH_SUFFIX = "prefect"


def remote_url(repo: Path, name: str) -> str | None:
    """The url of the DVC remote `name`, as DVC reads its config files (a local folder's
    made absolute). (`dvc remote list` wraps a long path in its table.)"""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc:
        return dvc.config["remote"].get(name, {}).get("url")


def goes_with_the_run(repo: Path, path: Path) -> Path | None:
    """The temporary folder a Prefect worker cloned `repo` into, deleted after the run,
    when `path` (relative: to `repo`, where the stages run) lies inside it; else None."""
    scratch = repo.resolve().parent
    temporary = (
        scratch.name.endswith(WORKER_SCRATCH_SUFFIX)
        and scratch.parent == Path(tempfile.gettempdir()).resolve()
    )
    return scratch if temporary and (repo / path).resolve().is_relative_to(scratch) else None


def check_remote_kept(repo: Path, name: str, url: str | None) -> None:
    """Refuse, before the work, a push to a remote that goes with the run: a local folder
    inside the temporary folder a Prefect worker cloned the repository into (the default
    remote, a folder beside the repository, lands there). Its "Pushed" was a lie."""
    if url and "://" not in url and (scratch := goes_with_the_run(repo, Path(url))):
        raise ReproError(
            f"DVC remote {name!r} ({url}) is inside this run's temporary folder {scratch}, "
            "deleted after the run: commit a remote the workers share in .dvc/config "
            '(README, "More machines"), or run with push off'
        )


def push_outputs(repo: Path, remote: str | None, log: Callable[[str], None] = print) -> bool:
    """`dvc push --run-cache`: the workspace's outputs, and the run cache (so that another
    clone's `dvc repro --pull` restores a stage instead of running it), to the default
    remote (`default_remote(repo)`); False, with a line saying so, when there is none."""
    if remote is None:
        log("no default DVC remote (dvc remote add -d): nothing pushed")
        return False
    done = subprocess.run(
        _dvc(["push", "--run-cache"]),
        cwd=repo,
        capture_output=True,
        text=True,
        env=stage_environment(),
    )
    for line in done.stdout.splitlines():
        log(line)
    if done.returncode != 0:
        cause = _dvc_error(done.stderr)
        raise ReproError(f"dvc push to {remote} failed in {repo}: {cause}")
    return True


def status_clean(repo: Path) -> bool:
    """Whether `dvc status` says everything is up to date. It waits for DVC's lock, which
    a `dvc repro` in a terminal may hold (DVC gives up after 3 s: a run whose stages all
    succeeded would fail at its last step)."""
    done = subprocess.run(
        _dvc(["--wait-for-lock", "status", "--json"]), cwd=repo, capture_output=True, text=True
    )
    if done.returncode != 0:
        cause = _dvc_error(done.stderr)
        raise ReproError(f"dvc status failed in {repo}: {cause}")
    return json.loads(done.stdout or "{}") == {}


def metrics(repo: Path) -> dict[str, float]:
    """The workspace's DVC metrics, flattened: {"metrics/eval.json:top1_error": 0.3, ...}."""
    done = subprocess.run(
        _dvc(["metrics", "show", "--json"]), cwd=repo, capture_output=True, text=True
    )
    if done.returncode != 0 or not done.stdout.strip():
        return {}
    files = json.loads(done.stdout).get("", {}).get("data", {})
    flat = {}
    for path, content in files.items():
        for key, value in (content.get("data") or {}).items():
            if isinstance(value, int | float):
                flat[f"{path}:{key}"] = value
    return flat


def metrics_diff(before: dict[str, float], after: dict[str, float]) -> list[dict]:
    """Rows like `dvc metrics diff`'s (path, metric, old, new, change) between two runs."""
    rows = []
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        path, metric = name.split(":", 1)
        change = None if old is None or new is None else round(new - old, 6)
        rows.append({"path": path, "metric": metric, "old": old, "new": new, "change": change})
    return rows
