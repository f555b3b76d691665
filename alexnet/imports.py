"""Which project files a module's code can run: the closure of its imports.

Read from the source (`ast`), not by importing: every `import` and `from ... import`
anywhere in a file counts, inside functions too, since a lazy import runs as surely
as one at the top. Only the project's own packages are followed; the result is the set
of their files, package `__init__.py` files included (Python runs them on the way).

Two users: each DVC stage's dependencies are the closure of its entry module (a test
holds dvc.yaml to it), and a checkpoint records the digests of the closure of the
training entry (`alexnet.digests`).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGES = ("alexnet", "flows", "tasks")


def module_file(root: Path, module: str) -> Path | None:
    """The file of a project module (`a.b` -> a/b.py or a/b/__init__.py), or None."""
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(root: Path, path: Path) -> frozenset[str]:
    """The project modules that `path` imports (and `from pkg import name` candidates
    `pkg.name`, which count when they are modules)."""
    package = _module_name(root, path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    return _imports(path.read_text(), str(path), package)


@functools.cache
def _imports(source: str, filename: str, package: str) -> frozenset[str]:
    """`imported_modules` of one source text. Kept by the text itself (an edited file is
    parsed afresh): each trainer digests the closure of its code when it starts, ~30
    files whose parsing took ~0.3 s, and one process can start many (the tests: ~90)."""
    found = set()
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from ..a import b
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join([*base, node.module] if node.module else base)
            else:
                stem = node.module or ""
            found.add(stem)
            found.update(f"{stem}.{alias.name}" for alias in node.names)
    return frozenset(name for name in found if name.split(".")[0] in PACKAGES)


def closure(root: Path, module: str) -> set[Path]:
    """The project files that running `module` can execute: itself, what it imports,
    transitively, and the `__init__.py` of every package on the way."""
    files: set[Path] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # a.b.c runs a/__init__, a/b/__init__ too
            path = module_file(root, ".".join(parts[:depth]))
            if path is None or path in files:
                continue
            files.add(path)
            pending.extend(imported_modules(root, path))
    return files
