"""What a Dask worker must share with the stage that maps tasks on it: the same files at
the same absolute paths, and the same code and libraries.

A data stage hands its workers absolute paths made on its own machine, its links
unresolved (each machine follows its own). A worker without the shared file system
would write a folder of the same name on its own disk
(the stage reporting success, the next stage reading a part of the data), and a
long-lived worker keeps the modules it imported when it started, while DVC records the
hash of the code on disk. So before any task, each worker answers `worker_view` once
and `problem` compares its answer with the stage's own. Pure logic: the Dask side is
flows/cluster.py.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from alexnet.atomic import remove_leftovers, temporary_name
from alexnet.digests import sha16
from alexnet.imports import PACKAGES, closure
from alexnet.pilcodecs import HAS, LACKS, pil_build

ROOT = Path(__file__).resolve().parents[1]
# The marker's name, as a temporary's (`.alexnet-check.tmp-HOST-PID`): the next check sweeps
# one that a killed stage left (`alexnet.atomic.remove_leftovers`).
MARKER = "alexnet-check"
SAME_FILES = "the workers need the same file system at the same paths"


def source_digests(root: Path = ROOT) -> dict[str, str]:
    """{path relative to root: sha16} of every module of the project's packages."""
    files = sorted(path for package in PACKAGES for path in (root / package).glob("*.py"))
    return {path.relative_to(root).as_posix(): sha16(path) for path in files}


# The code as this process found it when it imported the project: taken once, so a
# worker that imported before a change still answers with the old code. (On a worker
# the check is the first project code to run, ahead of any task.)
IMPORTED_CODE = source_digests()


def versions() -> dict[str, str]:
    """The interpreter and the libraries whose version changes the data stages' bytes.
    numpy and PIL as the live modules say (pillow-simd's versions carry `.postN`, see
    alexnet.doctor), with PIL's build (`pil_build`); torch as installed: the data tasks
    never import it (seconds)."""
    import numpy
    import PIL

    return {
        "Python": platform.python_version(),
        "numpy": numpy.__version__,
        "PIL": PIL.__version__,
        **pil_build(),
        "torch": importlib.metadata.version("torch"),
    }


@dataclass(frozen=True)
class WorkerCheck:
    """What the stage asks of every worker: its entry `module` (whose import closure is
    its code, as dvc.yaml's deps), the paths it writes and those it reads (absolute)."""

    module: str
    outputs: tuple[str, ...]
    inputs: tuple[str, ...]

    def code_files(self) -> list[str]:
        return sorted(path.relative_to(ROOT).as_posix() for path in closure(ROOT, self.module))

    def present_inputs(self) -> list[str]:
        """The inputs the stage itself finds: a missing one is the stage's own error."""
        return [path for path in self.inputs if os.path.exists(path)]


@dataclass(frozen=True)
class View:
    """What one process sees: each marker's token (None: no such file), the inputs it
    does not find, its code as imported and its library versions."""

    markers: dict[str, str | None]
    missing: list[str]
    code: dict[str, str]
    versions: dict[str, str]


def marker_folder(output: str) -> Path:
    """Where a marker for `output` goes: in the folder it names, or the nearest folder
    above it that exists (the stage makes it there). Named through `output` as given,
    links unresolved: the tasks write through that path, so a worker must find the
    marker through it too (a link there may lead elsewhere on the worker's machine)."""
    path = Path(output)
    return next(folder for folder in (path, *path.parents) if folder.is_dir())


@contextmanager
def markers(outputs: Iterable[str]) -> Iterator[dict[str, str]]:
    """{path: token}: a hidden file with a random token in each output's folder, where
    the stage writes anyway; removed on exit."""
    written: dict[str, str] = {}
    try:
        for folder in dict.fromkeys(map(marker_folder, outputs)):
            remove_leftovers(folder, MARKER)
            path, token = temporary_name(folder / MARKER), secrets.token_hex(16)
            path.write_text(token)
            written[str(path)] = token
        yield written
    finally:
        for path in written:
            Path(path).unlink(missing_ok=True)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:  # not there (or not readable): this worker does not see it
        return None


def worker_view(markers: list[str], inputs: list[str]) -> View:
    """Run on each worker: what it sees at the stage's paths, and what it runs."""
    return View(
        markers={path: _read(path) for path in markers},
        missing=[path for path in inputs if not os.path.exists(path)],
        code=IMPORTED_CODE,
        versions=versions(),
    )


def stage_view(tokens: dict[str, str]) -> View:
    """The stage's own: what every worker's view must match."""
    return View(markers=dict(tokens), missing=[], code=IMPORTED_CODE, versions=versions())


def problem(seen: View, stage: View, code_files: Iterable[str]) -> str | None:
    """Why a worker that sees `seen` may not run the stage's tasks, or None. The first
    reason only: one line, the one to fix first."""
    for path, token in stage.markers.items():
        if seen.markers.get(path) != token:
            marker = Path(path)
            return f"does not see {marker.parent} (no file {marker.name} there): {SAME_FILES}"
    if seen.missing:
        return f"does not see {seen.missing[0]} (no such file or folder there): {SAME_FILES}"
    changed = [name for name in code_files if seen.code.get(name) != stage.code.get(name)]
    if changed:
        files = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if changed[3:] else "")
        verb = "differs" if len(changed) == 1 else "differ"
        return f"runs other code ({files} {verb}; restart the workers after a change)"
    other = [
        difference(name, seen.versions.get(name), version)
        for name, version in stage.versions.items()
        if seen.versions.get(name) != version
    ]
    if other:
        return f"runs other libraries ({', '.join(other)}): install the stage's on the workers"
    return None


def difference(name: str, seen: str | None, stage: str) -> str:
    """One library's difference in words: a codec the worker lacks or has over the
    stage's, else the two versions."""
    if (seen, stage) == (LACKS, HAS):
        return f"no {name} where the stage has it"
    if (seen, stage) == (HAS, LACKS):
        return f"{name} where the stage has none"
    return f"{name} {seen} where the stage has {stage}"
