"""One truth for what each stage is made of: dvc.yaml against the code.

A stage's code dependencies are the import closure of its entry module (imports inside
functions included); its params, command and paths are those of its row in
flows/stages.py. Also the layering: the library imports no Prefect, has no import cycles
and changes nothing in the host process when imported.
"""

from __future__ import annotations

import ast
import signal
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from alexnet.digests import training_code
from alexnet.imports import PACKAGES, closure, imported_modules, module_file
from alexnet.params import load_params
from alexnet.repro import STAGES as CHAIN
from flows.stages import STAGES
from tests.helpers import REPO, run_python

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
CODE = tuple(f"{package}/" for package in PACKAGES)


def code_deps(stage: str) -> set[str]:
    return {dep for dep in DVC[stage]["deps"] if dep.startswith(CODE)}


def stage_closure(stage: str) -> set[str]:
    return {path.relative_to(REPO).as_posix() for path in closure(REPO, STAGES[stage].module)}


def test_the_chain_is_the_table_in_order():
    assert list(DVC) == list(STAGES) == list(CHAIN)


@pytest.mark.parametrize("stage", list(STAGES))
def test_code_deps_are_the_import_closure_of_the_entry_module(stage):
    deps, needed = code_deps(stage), stage_closure(stage)
    assert not needed - deps, f"dvc.yaml's {stage} lacks files its code imports"
    assert not deps - needed, f"dvc.yaml's {stage} lists files its code no longer imports"


@pytest.mark.parametrize("stage", list(STAGES))
def test_command_params_and_paths_come_from_the_table(stage):
    row, entry = STAGES[stage], DVC[stage]
    assert entry["cmd"] == f"python -m {row.module}"  # no paths: the table's defaults
    assert tuple(entry.get("params", ())) == row.params
    # Every data path DVC tracks lies in one of the stage's paths (a renamed default
    # path in the table leaves dvc.yaml pointing elsewhere, and fails here).
    paths = [f"${{{arg.default}}}" if arg.from_params else arg.default for arg in row.paths]
    paths += [path for arg in row.paths for path in arg.companion_defaults]
    tracked = [d for d in entry["deps"] if not d.startswith(CODE)]
    for key in ("outs", "metrics"):
        tracked += [next(iter(o)) if isinstance(o, dict) else o for o in entry.get(key, ())]
    for path in tracked:
        assert any(path == p or path.startswith(p.rstrip("/") + "/") for p in paths), path
    for key in row.params:  # each params key names a real field
        section, _, name = key.partition(".")
        fields = type(getattr(__import__("alexnet.params").params.Params(), section)).model_fields
        assert not name or name in fields, key


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_path_a_stage_reads_is_a_dvc_dep(stage):
    # the other direction of the test above: a path dropped from deps would let
    # `dvc repro` skip the stage when what it reads changes
    deps = DVC[stage]["deps"]
    for arg in STAGES[stage].paths:
        path = f"${{{arg.default}}}" if arg.from_params else arg.default
        assert arg.output or path in deps, f"dvc.yaml's {stage} does not depend on {path}"
        for path in arg.companion_defaults:
            assert path in deps, f"dvc.yaml's {stage} does not depend on {path}"


@pytest.mark.parametrize("stage", list(STAGES))
def test_the_paths_a_stage_writes_are_its_dvc_outs(stage):
    # `output` decides which paths may not lie inside the others (alexnet.atomic.check_apart)
    entry = DVC[stage]
    outs = [
        next(iter(o)) if isinstance(o, dict) else o
        for k in ("outs", "metrics")
        for o in entry.get(k, ())
    ]
    for arg in STAGES[stage].paths:
        default = arg.default.rstrip("/")
        written = any(out == default or out.startswith(f"{default}/") for out in outs)
        kept = (stage, arg.name) == ("train", "checkpoint")  # written, not an out (dvc.yaml)
        assert arg.output == (written or kept), arg.name


def test_each_stage_reads_what_an_earlier_stage_writes():
    # A renamed output must take its readers along: the table holds both ends, and the
    # test above holds dvc.yaml to the table.
    # `${prepare.raw}` is the user's folder, and with the repo's params.yaml the demo's,
    # which synth writes.
    raw = load_params(REPO / "params.yaml").prepare.raw
    written: list[str] = []
    for name, entry in DVC.items():
        data = [d for d in entry["deps"] if not d.startswith(CODE)]
        for path in data:
            path = raw if path == "${prepare.raw}" else path
            assert any(path == out or path.startswith(f"{out}/") for out in written), (name, path)
        written += [next(iter(o)) if isinstance(o, dict) else o for o in entry.get("outs", ())]


def test_the_params_of_a_stage_are_sections_its_flow_takes():
    for row in STAGES.values():
        assert {key.split(".")[0] for key in row.params} <= set(row.sections), row.name


def test_the_training_code_a_checkpoint_records_is_the_train_stage_code():
    files = {path.relative_to(REPO).as_posix() for path in training_code()}
    assert files == {p.relative_to(REPO).as_posix() for p in closure(REPO, "alexnet.fit")}
    assert files <= code_deps("train") and "alexnet/model.py" in files


def test_closure_follows_imports_inside_functions(tmp_path):
    (tmp_path / "alexnet").mkdir()
    (tmp_path / "alexnet" / "__init__.py").write_text("")
    (tmp_path / "alexnet" / "a.py").write_text("def f():\n    from alexnet import b\n")
    (tmp_path / "alexnet" / "b.py").write_text("from .c import x\n")
    (tmp_path / "alexnet" / "c.py").write_text("import os\nx = 1\n")
    (tmp_path / "alexnet" / "unused.py").write_text("")
    found = {p.name for p in closure(tmp_path, "alexnet.a")}
    assert found == {"__init__.py", "a.py", "b.py", "c.py"}


def test_an_edited_file_is_read_afresh_and_the_same_text_in_another_package_as_its_own(tmp_path):
    # imported_modules keeps what it parsed, by the source text: an edit (as the tests'
    # one-line edits of a stage's code, or a user's between two trainings in one
    # process) must be seen, and a relative import read from where the file lies.
    for package in ("alexnet", "flows"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / "a.py").write_text("from . import b\n")
    first = imported_modules(tmp_path, tmp_path / "alexnet" / "a.py")
    assert first == {"alexnet", "alexnet.b"}
    assert imported_modules(tmp_path, tmp_path / "flows" / "a.py") == {"flows", "flows.b"}
    (tmp_path / "alexnet" / "a.py").write_text("from . import c\n")
    assert imported_modules(tmp_path, tmp_path / "alexnet" / "a.py") == {"alexnet", "alexnet.c"}


def test_no_import_cycles_in_the_project():
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).glob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = {
                m
                for m in imported_modules(REPO, path)
                if module_file(REPO, m) and m != name and not name.startswith(m + ".")
            }

    def visit(name: str, trail: tuple[str, ...]) -> None:
        assert name not in trail, " -> ".join([*trail, name])
        for other in modules.get(name, ()):
            visit(other, (*trail, name))

    for name in modules:
        visit(name, ())


def test_every_stage_but_prepare_can_be_restored_from_the_run_cache():
    # DVC saves no run-cache entry for a stage with an out kept out of its cache
    # (`cache: false`) unless that out is a metric or a plot (dvc/stage/__init__.py,
    # `Stage.run`): train and evaluate ran again in every clone and on every worker.
    # prepare's out is `persist`: never run-cached (`dvc.stage.cache._can_hash`, whose
    # conditions on the outs are these; it also hashes the deps: the data, not here).
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        stages = list(repo.index.stages)
    cached = [
        stage.name
        for stage in stages
        if all(out.protocol == "local" and out.is_in_repo and not out.persist for out in stage.outs)
        and all(out.use_cache or out.is_metric or out.is_plot for out in stage.outs)
    ]
    assert cached == [stage for stage in CHAIN if stage != "prepare"]
    # and git leaves the cached ones to DVC, even where a stage's folder swap took the
    # .gitignore DVC writes beside them (evaluate's metrics/eval, outside `dvc repro`)
    ignored = (REPO / ".gitignore").read_text().split()
    for stage in stages:
        for out in stage.outs:
            if out.use_cache and out.def_path.startswith("metrics/"):
                assert f"/{out.def_path}" in ignored, out.def_path


def test_a_killed_cluster_checks_marker_is_no_part_of_an_output(tmp_path):
    # a SIGKILL during the check leaves it in data/prepared until the next check
    from dvc.repo import Repo

    from alexnet.atomic import temporary_name
    from alexnet.cluster import MARKER

    leftover = temporary_name(REPO / "data" / "prepared" / MARKER)
    with Repo(str(REPO)) as repo:
        assert repo.dvcignore.is_ignored_file(str(leftover))
        assert not repo.dvcignore.is_ignored_file(str(leftover.with_name("shard-00000.tar")))


def test_the_split_names_are_written_once():
    # alexnet.shards.SPLITS; flows/train.py and flows/pack.py had their own copies.
    written = []
    for package in PACKAGES:
        for path in sorted((REPO / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Tuple | ast.List) and [
                    getattr(item, "value", None) for item in node.elts
                ] == ["train", "val"]:
                    written.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert written == ["alexnet/shards.py:30"]


# No inherited hints: the child starts as a user's shell would.
CLEAN = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}


def library_modules() -> list[str]:
    return sorted(
        f"alexnet.{p.stem}" for p in (REPO / "alexnet").glob("*.py") if p.stem != "__init__"
    )


def test_no_prefect_import_is_written_in_the_library():
    # Also the imports that only run inside a function: read from the source.
    for path in sorted((REPO / "alexnet").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            assert not [n for n in names if n.split(".")[0] == "prefect"], path.name


def test_the_library_imports_no_prefect():
    # With prefect made unimportable, every module of alexnet/ still imports.
    done = run_python(
        textwrap.dedent(
            f"""
        import importlib
        for name in {library_modules()!r}:
            importlib.import_module(name)
        print("ok")
        """
        ),
        env=CLEAN,
        blocked=("prefect",),
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_importing_the_library_changes_nothing_in_the_host_process():
    done = run_python(
        textwrap.dedent(
            f"""
        import importlib, os, torch, torchvision.io  # third parties set their own
        before = dict(os.environ)
        deterministic = torch.are_deterministic_algorithms_enabled()
        for name in {library_modules()!r}:
            importlib.import_module(name)
        assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())
        assert torch.are_deterministic_algorithms_enabled() == deterministic
        assert not hasattr(torch.ops.alexnet, "lrn_forward_cpu"), "an op was registered"
        from alexnet.runtime import HINTS, configure
        configure()  # the explicit set-up entry points call
        assert all(os.environ[k] == v for k, v in HINTS.items())
        print("ok")
        """
        ),
        env=CLEAN,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_fit_sets_determinism_and_sigterm_for_its_run_only(data, tmp_path):
    from alexnet.fit import fit
    from tests.helpers import train_run

    before = signal.getsignal(signal.SIGTERM)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    seen = []

    def log(line: str) -> None:  # called during the run, after each epoch
        seen.append(
            (torch.are_deterministic_algorithms_enabled(), signal.getsignal(signal.SIGTERM))
        )

    try:
        fit(train_run(data, tmp_path, epochs=1, batch_size=10, deterministic=True), log=log)
        assert seen and seen[-1][0] and seen[-1][1] is not before
        assert not torch.are_deterministic_algorithms_enabled()
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        torch.use_deterministic_algorithms(previous)


def test_only_the_training_entry_sets_determinism(data, tmp_path):
    from alexnet.train import Trainer
    from tests.helpers import train_run

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        Trainer(train_run(data, tmp_path, deterministic=True, epochs=1))
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(previous)


def test_the_evaluate_stages_image_plots_are_the_figures_it_draws():
    from alexnet.figures import FIGURES

    plots = [next(iter(p)) if isinstance(p, dict) else p for p in DVC["evaluate"]["plots"]]
    images = [p for p in plots if p.endswith(".png")]
    assert images == [f"metrics/eval/{name}.png" for name in FIGURES]
    # and its class plots draw the tables of the worst classes, not every class's
    from alexnet.eval_files import WORST_CLASSES, WORST_CONFUSION

    tables = [p for p in plots if p.endswith(".csv")]
    assert tables == [f"metrics/eval/{name}.csv" for name in (WORST_CONFUSION, WORST_CLASSES)]


def test_the_design_docs_layout_names_every_module():
    layout = (REPO / "docs" / "design.md").read_text()
    for path in sorted((REPO / "alexnet").glob("*.py")):
        assert path.name == "__init__.py" or f"\n  {path.name} " in layout, path.name
