"""The six stage commands, built from one table: `STAGES`.

Each row says which flow runs the stage, its paths with their defaults (the one place a
stage's default paths are written: dvc.yaml's `python -m flows.<stage>` passes none, and a
test checks dvc.yaml's deps and outs against this table), the params sections the flow
takes, the params keys whose change re-runs the stage (dvc.yaml's `params`), and the line
printed when it is done. `alexnet <stage>` (flows/cli.py) and `python -m flows.<stage>`
both run `run_stage`: params.yaml validated, the flow run on the task runner params
`compute` chooses, against one Prefect API, a user's error as one line.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated
from uuid import UUID

import typer
from rich.console import Console
from rich.text import Text

from alexnet.atomic import check_apart
from alexnet.cluster import WorkerCheck
from alexnet.errors import Interrupted, is_user_error, user_line
from alexnet.params import (
    DEFAULT_FILE,
    ComputeParams,
    Params,
    PrepareParams,
    load_params,
    param_value,
    recipe_keys,
    with_compute,
)
from alexnet.runtime import configure
from alexnet.shards import CLASSES_FILE
from tasks.quiet import INTERRUPTED, note_interrupts, quiet_console_tracebacks

# markup off: a path or key may hold brackets ("[draft]"), which rich would read as tags
console = Console(stderr=True, soft_wrap=True, markup=False)
# The id of a flow run a pipeline run created for this stage, as a child of its task
# (flows/pipeline.py): the stage command runs that one instead of a new one.
PLANNED_RUN = "ALEXNET_PLANNED_FLOW_RUN"  # one error = one line, however long


def compute_help(key: str) -> str:
    """A `compute` param's description, for the stage option that overrides it."""
    return ComputeParams.model_fields[key].description


@dataclass(frozen=True)
class PathArg:
    name: str  # the flow's parameter
    default: str  # or, for `from_params`, the params key that holds it
    help: str
    option: bool = False  # --name PATH instead of a positional argument
    from_params: bool = False  # the default is the value of params key `default`
    # When the path named here is given and this one is not: this one where it stands
    # beside that one as the defaults do (`evaluate VAL`: VAL/../train).
    beside: str | None = None
    output: bool = False  # what the stage writes (dvc.yaml's outs); the rest it reads
    envvar: str | None = None  # an environment variable that gives it when no argument does
    # Files beside this path (in its folder's parent) that the stage reads too: dvc.yaml
    # deps (stats checks `train`'s labels against the prepared folder's classes.json).
    companions: tuple[str, ...] = ()

    @property
    def metavar(self) -> str:
        """How `--help` and the README name it: `model_path` is MODEL."""
        return self.name.removesuffix("_path").upper()

    @property
    def companion_defaults(self) -> tuple[str, ...]:
        """The companions of the default path (dvc.yaml's deps)."""
        return tuple((Path(self.default).parent / name).as_posix() for name in self.companions)

    def from_environment(self) -> str | None:
        """`envvar`'s value, where it is set to one (typer, through click, ignores an
        empty one too)."""
        return (os.environ.get(self.envvar) or None) if self.envvar else None


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    paths: tuple[PathArg, ...]
    sections: tuple[str, ...]  # params sections the flow takes, as keyword arguments
    params: tuple[str, ...]  # params keys the stage's result depends on (dvc.yaml)
    done: str  # printed at the end, formatted with the flow's result and the paths
    parallel: bool = False  # maps tasks on a process pool or Dask (--workers, --scheduler)

    @property
    def module(self) -> str:
        return f"flows.{self.name}"

    def path(self, name: str) -> PathArg:
        return next(arg for arg in self.paths if arg.name == name)

    def shown_default(self, arg: PathArg) -> str:
        """`arg`'s default as `--help` shows it (`resolve_paths` applies it)."""
        if arg.from_params:
            return f"params {arg.default}"
        if arg.beside:
            given = self.path(arg.beside).metavar
            return f"{arg.default}; given {given}: {self.beside(arg)} beside it"
        return arg.default

    def beside(self, arg: PathArg) -> Path:
        """Where `arg`'s default stands relative to the folder of its `beside` path's."""
        return Path(arg.default).relative_to(Path(self.path(arg.beside).default).parent)

    def flow(self) -> Callable:
        return getattr(importlib.import_module(self.module), f"{self.name}_flow")

    def refusal(self) -> Callable[..., object]:
        """What stops the stage before any work: its logic module's `refuse`
        (`alexnet.STAGE`), which imports no Prefect. The stage command calls it before
        Prefect or the flow is imported (`run_stage`), the flow first."""
        return importlib.import_module(f"alexnet.{self.name}").refuse


DEMO_RAW: str = PrepareParams.model_fields["raw"].default

STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            "synth",
            "Generate the built-in demo dataset (params `synth`): shapes x textures, plus a "
            "few CMYK, greyscale, PNG-as-JPEG, truncated, empty and non-image files. Its size: "
            "params synth.classes, train_per_class, val_per_class; synth.oddities files of "
            "each odd kind, which prepare converts or skips (a small set wants few of them, "
            "or a higher prepare.max_skipped).",
            # the demo's raw folder: where prepare reads by default
            (PathArg("out", DEMO_RAW, "folder to create (ImageFolder layout)", output=True),),
            ("synth",),
            ("synth",),
            "synth: {images} images and {oddities} odd files in {out}",
            parallel=True,
        ),
        Stage(
            "prepare",
            "Rescale every image so its shorter side is params `prepare.size` (the paper's "
            "256), centre-crop it square, and write WebDataset tar shards (params "
            "`prepare`). Bad files are skipped and listed in OUT/report.json; a killed run "
            "continues where it stopped.",
            (
                PathArg(
                    "raw",
                    "prepare.raw",
                    "raw dataset: train/<wnid>/*, val/... (layouts: docs/design.md)",
                    from_params=True,
                ),
                PathArg(
                    "out", "data/prepared", "output folder for shards + report.json", output=True
                ),
            ),
            ("prepare", "compute"),
            ("prepare",),
            "prepare: {kept} kept, {converted} converted, {skipped} skipped of {files} "
            "files; report in {out}/report.json",
            parallel=True,
        ),
        Stage(
            "stats",
            "Compute the mean image (`prepare.size` square, RGB, 0-255) and the RGB PCA "
            "(covariance, eigenvalues, eigenvectors) of the training set, exactly, by "
            "map-reduce over shards.",
            (
                PathArg(
                    "train",
                    "data/prepared/train",
                    "prepared training shards",
                    companions=(CLASSES_FILE,),
                ),
                PathArg("out", "data/stats", "output folder: mean.npy, pca.json", output=True),
            ),
            ("prepare", "compute"),
            ("prepare.size",),
            "stats: {images} images; written to {out}/mean.npy, {out}/pca.json",
            parallel=True,
        ),
        Stage(
            "pack",
            "Pack the prepared shards into one LMDB store per split (params `pack`; schema "
            "in docs/design.md): train in a seeded shuffled order, val in source order; "
            "run again after a kill, it keeps a split it finished.",
            (
                PathArg("prepared", "data/prepared", "prepared folder (train/, val/ shards)"),
                PathArg("out", "data/lmdb", "output folder: one LMDB per split", output=True),
            ),
            ("pack", "prepare", "compute"),
            ("pack", "prepare.size"),
            "pack: {train} train and {val} val records written to {out}",
            parallel=True,
        ),
        Stage(
            "train",
            "Train AlexNet with the paper's recipe (params `train`, `model`); resumes from "
            "the last checkpoint after a kill, and checkpoints on SIGTERM before exiting.",
            (
                PathArg("lmdb", "data/lmdb", "folder with the train/ and val/ LMDB stores"),
                PathArg("stats", "data/stats", "folder with mean.npy and pca.json"),
                PathArg("model_path", "models/alexnet.pt", "model file to write", output=True),
                PathArg(
                    "checkpoint",
                    "models/checkpoints/train.pt",
                    "checkpoint file, resumed when it belongs to this run. A Prefect "
                    "worker's run is a temporary clone: give its workers a path outside it "
                    "to resume there",
                    option=True,
                    beside="model_path",
                    output=True,
                    envvar="ALEXNET_CHECKPOINT",
                ),
                PathArg(
                    "metrics",
                    "metrics",
                    "folder for train.json and plots",
                    option=True,
                    output=True,
                ),
            ),
            ("train", "model", "prepare", "compute"),
            (
                *recipe_keys("train"),
                "model",
                *(f"prepare.{key}" for key in PrepareParams.IMAGE_KEYS),  # in the model file
                "compute.kernels",
                "compute.jpeg_decoder",
            ),
            "train: trained to epoch {epochs}; val top-1 error {val_top1_error:.3f}, top-5 "
            "{val_top5_error:.3f}; model in {model_path}",
        ),
        Stage(
            "evaluate",
            "10-crop top-1/top-5 error of a model (paper section 4.1; params `evaluate`): "
            "METRICS/eval.json, per-class errors, every image's prediction and the plots' data in "
            "METRICS/eval/; and section 6.1's pictures there: conv1's kernels, validation "
            "images with their top 5, and their nearest training images.",
            (
                PathArg("val", "data/lmdb/val", "the validation LMDB store"),
                PathArg("model_path", "models/alexnet.pt", "model file from train"),
                PathArg(
                    "train",
                    "data/lmdb/train",
                    "the training LMDB store (searched for the nearest neighbours)",
                    option=True,
                    beside="val",
                ),
                PathArg(
                    "metrics",
                    "metrics",
                    "folder for eval.json and eval/",
                    option=True,
                    output=True,
                ),
            ),
            ("evaluate", "compute"),
            (*recipe_keys("evaluate"), "compute.kernels", "compute.jpeg_decoder"),
            "evaluate: {images} images; 10-crop top-1 error {top1_error:.3f}, top-5 "
            "{top5_error:.3f} (centre crop {center_top1_error:.3f}, {center_top5_error:.3f})",
        ),
    )
}


ParamsOption = Annotated[
    Path | None,
    typer.Option(
        "--params",
        "-p",
        help="params file; where the default, ./params.yaml, is missing, every key takes its "
        "schema default (the paper's recipe, on a CPU: params.imagenet.yaml is the ImageNet "
        "run's file)",
        show_default=DEFAULT_FILE,
    ),
]


@contextmanager
def user_errors() -> Iterator[None]:
    """A user-fixable error becomes one red line and exit status 1 (no traceback)."""
    try:
        yield
    except Exception as error:
        if not is_user_error(error):
            raise
        _send_prefect_logs()
        console.print(Text("error:", style="bold red"), user_line(error), highlight=False)
        raise typer.Exit(1) from None


def _send_prefect_logs(timeout: float = 5.0) -> None:
    """Let Prefect send the events and logs it still holds now, which it otherwise does
    at exit with a warning that came after the error line: the error is the last word.
    None without Prefect loaded: an error before any (a refusal, `alexnet report`'s) has
    nothing to send, and importing it cost ~2 s of a CPU before the line."""
    if sys.modules.get("prefect") is None:  # (None: an import of it refused)
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (EventsWorker, APILogWorker):
        worker.drain_all(timeout=timeout, at_exit=False)


# How the command line says params' null: an option left out (None) keeps the file's value.
NULL = "null"


def load(
    path: Path | None,
    workers: int | None = None,
    scheduler: str | None = None,
    *,
    say_defaults: bool = True,
) -> Params:
    """The params file (None: params.yaml, if any) with the command line's `compute`
    overrides applied; `say_defaults`: a line on stderr where none is here, for a command
    that computes with them."""
    if say_defaults and path is None and not Path(DEFAULT_FILE).exists():  # another folder?
        console.print(
            f"params: no {DEFAULT_FILE} in {Path.cwd()}: every key takes its schema default "
            "(the paper's recipe on a CPU, not the demo's; params.imagenet.yaml is ImageNet's)",
            highlight=False,
        )
    params = load_params(path)
    overrides = {"workers": workers, "scheduler": scheduler}
    changed = {key: value for key, value in overrides.items() if value is not None}
    if changed.get("scheduler") == NULL:  # the process pool, where the file names a cluster
        changed["scheduler"] = None
    return with_compute(params, **changed) if changed else params


def resolve_paths(stage: Stage, given: dict[str, Path | None], params: Params) -> dict[str, str]:
    """The stage's paths: as given, else the table's default (or the params key's value),
    or, beside a path given in its place, where its default stands beside that one's."""
    paths = {}
    for arg in stage.paths:
        value = given.get(arg.name)
        if value is None and arg.beside and given.get(arg.beside) is not None:
            beside = Path(os.path.abspath(given[arg.beside])).parent  # `.` has a parent too
            value = beside / stage.beside(arg)
        if value is None:
            value = param_value(params, arg.default) if arg.from_params else arg.default
        paths[arg.name] = str(value)
    return paths


def run_stage(stage: Stage, paths: dict[str, str], params: Params, flow: Callable | None = None):
    """Run the stage's flow (a data stage's on the task runner the params choose)
    against one Prefect API for the whole run (flows/server.py); returns its result. When a pipeline
    run planned this stage's flow run (its id in PLANNED_RUN), that run is the one run."""
    roles = {arg.name: arg.output for arg in stage.paths}
    check_apart(  # before Prefect and the flow are imported (~2 s of a CPU): at once
        {name: path for name, path in paths.items() if roles[name]},
        {name: path for name, path in paths.items() if not roles[name]},
    )
    # Absolute: a Dask worker started in another folder, or on another machine sharing
    # the file system, reads and writes the same files as this process.
    absolute = {name: os.path.abspath(path) for name, path in paths.items()}
    arguments = {**absolute, **{name: getattr(params, name) for name in stage.sections}}
    planned = os.environ.pop(PLANNED_RUN, None)  # not for this process's children
    # The stage's own flow (the command's, or `python -m flows.STAGE`'s, named after the
    # stage), not a test's: refused before Prefect is imported, a server started or a
    # flow run made. (A planned run fails in the UI with the reason: the flow checks too.)
    own = flow is None or getattr(flow, "name", None) == stage.name
    if own and not planned:
        stage.refusal()(**arguments)
    from prefect.settings import PREFECT_API_URL

    from flows.runners import check_lasting_api, check_scheduler, task_runner
    from flows.server import prefect_api

    flow = flow or stage.flow()
    scheduler = params.compute.scheduler
    if stage.parallel:
        check_scheduler(scheduler)
        check_lasting_api(scheduler, PREFECT_API_URL.value())
    quiet_console_tracebacks()
    note_interrupts()
    with prefect_api() as api_url:
        if stage.parallel:  # train and evaluate map no tasks: no pool, no cluster to reach
            threads = check_running_cluster(stage, absolute, roles, scheduler, api_url)
            if threads and not params.compute.workers and "compute" in arguments:
                # 0 workers: the cluster's own count (prepare keeps 4 shards a worker in
                # flight: this machine's core count left a cluster of 32 mostly idle)
                arguments["compute"] = params.compute.model_copy(update={"workers": threads})
            flow = flow.with_options(task_runner=task_runner(scheduler, params.compute.workers))
        if not planned:
            return flow(**arguments)
        from prefect.client.orchestration import get_client
        from prefect.flow_engine import run_flow

        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(UUID(planned))
        return run_flow(flow, flow_run=flow_run, parameters=arguments)


def check_running_cluster(
    stage: Stage,
    absolute: dict[str, str],
    roles: dict[str, bool],
    scheduler: str | None,
    api_url: str,
) -> int | None:
    """On a running cluster (not a pool, not a LocalCluster of this process): do its
    workers see the stage's `absolute` paths (outputs where `roles` is true), run this
    code, reach this Prefect API? Before the flow is given its runner: a refusal leaves
    no flow run behind. Returns the cluster's threads (None: no running cluster)."""
    if scheduler in (None, "local"):
        return None
    from flows.cluster import check_cluster

    check = WorkerCheck(
        stage.module,
        outputs=tuple(path for name, path in absolute.items() if roles[name]),
        inputs=tuple(path for name, path in absolute.items() if not roles[name]),
    )
    return check_cluster(scheduler, check, api_url)


def command(stage: Stage, flow: Callable | None = None) -> Callable[..., None]:
    """The typer command of a stage: its paths as arguments (or options), `--params`, and
    for the parallel stages `--workers` and `--scheduler`."""

    def run(
        params_path: Path | None,
        workers: int | None = None,
        scheduler: str | None = None,
        **given: Path | None,
    ) -> None:
        with user_errors():
            params = load(params_path, workers, scheduler)
            paths = resolve_paths(stage, given, params)
            try:
                result = run_stage(stage, paths, params, flow)
            except Interrupted as stop:
                console.print(f"{stage.name}: {stop}; checkpoint saved, run again to continue")
                raise typer.Exit(143) from None
            except (Exception, KeyboardInterrupt) as error:
                # Ctrl-C (or an error a library made of it): what was whole is kept
                # (prepare's shards, train's last checkpoint), what was not is removed
                if not (isinstance(error, KeyboardInterrupt) or INTERRUPTED.is_set()):
                    raise
                console.print(f"{stage.name}: interrupted; run again to continue")
                raise typer.Exit(130) from None
        console.print(stage.done.format(**result, **paths), highlight=False)

    keyword = inspect.Parameter.KEYWORD_ONLY
    parameters = [
        inspect.Parameter(
            arg.name,
            keyword,
            default=None,
            annotation=Annotated[
                Path | None,
                (typer.Option if arg.option else typer.Argument)(
                    help=arg.help,
                    show_default=stage.shown_default(arg),
                    envvar=arg.envvar,
                    metavar=None if arg.option else arg.metavar,
                ),
            ],
        )
        for arg in stage.paths
    ]
    parameters.append(
        inspect.Parameter("params_path", keyword, default=None, annotation=ParamsOption)
    )
    if stage.parallel:
        parameters += [
            inspect.Parameter(
                "workers",
                keyword,
                default=None,
                annotation=Annotated[
                    int | None,
                    typer.Option(
                        help=f"{compute_help('workers')} (default: params compute.workers)"
                    ),
                ],
            ),
            inspect.Parameter(
                "scheduler",
                keyword,
                default=None,
                annotation=Annotated[
                    str | None,
                    typer.Option(
                        help=f"{compute_help('scheduler')} (default: params compute.scheduler)"
                    ),
                ],
            ),
        ]
    run.__signature__ = inspect.Signature(parameters)
    run.__doc__ = stage.help
    return run


def main(name: str, flow: Callable | None = None) -> None:
    """`python -m flows.<name> [PATHS...] [--params FILE]`: the stage as DVC runs it."""
    configure()
    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    app.command(name=name)(command(STAGES[name], flow))
    app(prog_name=f"python -m flows.{name}")
