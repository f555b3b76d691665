"""Running the chain through DVC, for the Prefect deployments (flows/pipeline.py).

Every run started from the Prefect UI or a schedule is `dvc repro`, so `dvc.lock` stays
the truth: after it, `dvc status` is clean, and a run with nothing changed does nothing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from alexnet.errors import AlexnetError

Stage = Literal["synth", "prepare", "stats", "pack", "train", "evaluate"]
STAGES: tuple[str, ...] = Stage.__args__  # the chain's order

_RUNNING = re.compile(r"Running stage '([\w-]+)'")


class ReproError(AlexnetError):
    """`dvc repro` failed; the message ends with DVC's last line."""


def _dvc(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def _environment() -> dict[str, str]:
    """The stages' `python -m flows.<stage>` commands must be this environment's, even when it is
    not activated (a Prefect worker, `.venv/bin/python -m ...`): its bin/ goes first."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}


def repro(
    repo: Path, target: str | None = None, force: bool = False, log: Callable[[str], None] = print
) -> list[str]:
    """`dvc repro [--force] [target]` in `repo`, its output passed to `log` line by line;
    returns the stages that ran (none when everything was up to date)."""
    command = _dvc(["repro", *(["--force"] if force else []), *([target] if target else [])])
    process = subprocess.Popen(
        command,
        cwd=repo,
        stdout=subprocess.PIPE,
        env=_environment(),
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    ran, last, cause = [], "", ""
    for line in process.stdout:
        line = line.rstrip()
        if line:
            log(line)
            last = line
        if line.startswith("error:"):  # a stage's own one-line error (alexnet CLI)
            cause = line
        if match := _RUNNING.search(line):
            ran.append(match.group(1))
    if process.wait() != 0:
        raise ReproError(
            " ".join(f"dvc repro {target or ''} failed in {repo}:".split()) + f" {cause or last}"
        )
    return ran


def status_clean(repo: Path) -> bool:
    """Whether `dvc status` says everything is up to date."""
    done = subprocess.run(
        _dvc(["status", "--json"]), cwd=repo, capture_output=True, text=True, check=True
    )
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
