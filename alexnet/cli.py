"""`alexnet`: the command line of the pipeline. Each stage command runs that stage's
Prefect flow with the knobs of `params.yaml`; `dvc repro` calls these same commands.

(The library itself never imports Prefect; only this entry point reaches into `flows/`,
lazily, so `alexnet --help` stays fast.)
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from alexnet.errors import AlexnetError
from alexnet.params import Params, load_params

app = typer.Typer(
    help="AlexNet (Krizhevsky et al. 2012) as a reproducible pipeline: synth -> prepare -> "
    "stats -> pack -> train -> evaluate. Run the whole chain with `dvc repro`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True, soft_wrap=True)  # one error = one line, however long

ParamsOption = Annotated[
    Path, typer.Option("--params", "-p", help="params file (see params.yaml for every knob)")
]
WorkersOption = Annotated[
    int | None, typer.Option(help="parallel workers (default: params compute.workers; 0 = cores)")
]
SchedulerOption = Annotated[
    str | None,
    typer.Option(help="Dask scheduler: 'local' or tcp://host:port (default: params compute)"),
]


def _params(path: Path, workers: int | None = None, scheduler: str | None = None) -> Params:
    """params.yaml with the command line's `compute` overrides applied."""
    params = load_params(path)
    overrides = {"workers": workers, "scheduler": scheduler}
    compute = params.compute.model_copy(
        update={k: v for k, v in overrides.items() if v is not None}
    )
    return params.model_copy(update={"compute": compute})


@contextmanager
def _user_errors() -> Iterator[None]:
    """A user-fixable error becomes one red line and exit status 1 (no traceback)."""
    try:
        yield
    except AlexnetError as error:
        console.print(f"[bold red]error:[/] {error}", highlight=False)
        raise typer.Exit(1) from None


class _NoUserErrorTracebacks(logging.Filter):
    """Drop console records carrying an AlexnetError: the CLI prints it as one line (the
    Prefect API still receives the full record for the UI)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], AlexnetError))


def _quiet_console_tracebacks() -> None:
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *map(logging.getLogger, logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler):
                handler.addFilter(_NoUserErrorTracebacks())


def _run(module: str, name: str, params: Params, *args: Any) -> Any:
    """Run flow `module.name` on the task runner the params choose, against one Prefect
    API for the whole run (see flows/server.py)."""
    from flows.runners import task_runner
    from flows.server import prefect_api

    flow = getattr(importlib.import_module(module), name)
    runner = task_runner(params.compute.scheduler, params.compute.workers)
    _quiet_console_tracebacks()
    with prefect_api():
        return flow.with_options(task_runner=runner)(*args)


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="folder to create (ImageFolder layout)")] = Path(
        "data/raw"
    ),
    params_path: ParamsOption = Path("params.yaml"),
    workers: WorkersOption = None,
    scheduler: SchedulerOption = None,
) -> None:
    """Generate the built-in demo dataset (params `synth`): shapes x textures, plus a few
    CMYK, greyscale, PNG-as-JPEG, truncated, empty and non-image files."""
    with _user_errors():
        params = _params(params_path, workers, scheduler)
        _run("flows.synth", "synth_flow", params, str(out), params.synth)


@app.command()
def prepare(
    raw: Annotated[Path, typer.Argument(help="raw dataset: train/<wnid>/*, val/...")] = Path(
        "data/raw"
    ),
    out: Annotated[Path, typer.Argument(help="output folder for shards + report.json")] = Path(
        "data/prepared"
    ),
    params_path: ParamsOption = Path("params.yaml"),
    workers: WorkersOption = None,
    scheduler: SchedulerOption = None,
) -> None:
    """Rescale every image so its shorter side is 256, centre-crop 256x256, and write
    WebDataset tar shards (params `prepare`). Bad files are skipped and listed in
    OUT/report.json; a killed run continues where it stopped."""
    with _user_errors():
        params = _params(params_path, workers, scheduler)
        counts = _run("flows.prepare", "prepare_flow", params, str(raw), str(out), params.prepare)
    console.print(
        f"prepare: {counts['kept']} kept, {counts['converted']} converted, "
        f"{counts['skipped']} skipped of {counts['files']} files; report in {out / 'report.json'}",
        soft_wrap=True,
    )


@app.command()
def stats(
    train: Annotated[Path, typer.Argument(help="prepared training shards")] = Path(
        "data/prepared/train"
    ),
    out: Annotated[Path, typer.Argument(help="output folder: mean.npy, pca.json")] = Path(
        "data/stats"
    ),
    params_path: ParamsOption = Path("params.yaml"),
    workers: WorkersOption = None,
    scheduler: SchedulerOption = None,
) -> None:
    """Compute the mean image (256x256x3, RGB, 0-255) and the RGB PCA (covariance,
    eigenvalues, eigenvectors) of the training set, exactly, by map-reduce over shards."""
    with _user_errors():
        params = _params(params_path, workers, scheduler)
        result = _run("flows.stats", "stats_flow", params, str(train), str(out))
    console.print(f"stats: {result['images']} images; written to {out}/mean.npy, {out}/pca.json")


@app.command()
def pack(
    prepared: Annotated[Path, typer.Argument(help="prepared folder (train/, val/ shards)")] = Path(
        "data/prepared"
    ),
    out: Annotated[Path, typer.Argument(help="output folder: one LMDB per split")] = Path(
        "data/lmdb"
    ),
    params_path: ParamsOption = Path("params.yaml"),
    workers: WorkersOption = None,
    scheduler: SchedulerOption = None,
) -> None:
    """Pack the prepared shards into one LMDB store per split (params `pack`; the
    schema is in DESIGN.md): train in a seeded shuffled order, val in source order."""
    with _user_errors():
        params = _params(params_path, workers, scheduler)
        cores = params.compute.workers or os.cpu_count() or 1
        counts = _run(
            "flows.pack", "pack_flow", params, str(prepared), str(out), params.pack, cores
        )
    console.print(f"pack: {counts} records written to {out}")


@app.command()
def train(
    lmdb: Annotated[
        Path, typer.Argument(help="folder with the train/ and val/ LMDB stores")
    ] = Path("data/lmdb"),
    stats: Annotated[Path, typer.Argument(help="folder with mean.npy and pca.json")] = Path(
        "data/stats"
    ),
    model_path: Annotated[Path, typer.Argument(help="model file to write")] = Path(
        "models/alexnet.pt"
    ),
    checkpoint: Annotated[Path, typer.Option(help="checkpoint file (resumed when current)")] = Path(
        "models/checkpoints/train.pt"
    ),
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """Train AlexNet with the paper's recipe (params `train`, `model`); resumes from the
    last checkpoint after a kill, and checkpoints on SIGTERM before exiting."""
    from alexnet.train import Interrupted

    with _user_errors():
        params = _params(params_path)
        try:
            summary = _run(
                "flows.train",
                "train_flow",
                params,
                str(lmdb),
                str(stats),
                str(model_path),
                str(checkpoint),
                "metrics",
                params.train,
                params.model,
            )
        except Interrupted as stop:
            console.print(f"train: {stop}; checkpoint saved, run again to continue")
            raise typer.Exit(143) from None
    console.print(
        f"train: {summary['epochs']} epochs; val top-1 error {summary['val_top1_error']:.3f}, "
        f"top-5 {summary['val_top5_error']:.3f}; model in {model_path}"
    )


@app.command()
def evaluate(
    val: Annotated[Path, typer.Argument(help="the validation LMDB store")] = Path("data/lmdb/val"),
    stats: Annotated[Path, typer.Argument(help="folder with mean.npy")] = Path("data/stats"),
    model_path: Annotated[Path, typer.Argument(help="model file from train")] = Path(
        "models/alexnet.pt"
    ),
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """10-crop top-1/top-5 error of a model (paper section 4.1; params `evaluate`):
    metrics/eval.json, a per-class CSV and the confusion plot's data in metrics/eval/."""
    with _user_errors():
        params = _params(params_path)
        summary = _run(
            "flows.evaluate",
            "evaluate_flow",
            params,
            str(val),
            str(stats),
            str(model_path),
            "metrics",
            params.evaluate,
        )
    console.print(
        f"evaluate: {summary['images']} images; 10-crop top-1 error {summary['top1_error']:.3f}, "
        f"top-5 {summary['top5_error']:.3f} (centre crop {summary['center_top1_error']:.3f}, "
        f"{summary['center_top5_error']:.3f})"
    )


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="image files (any format PIL reads)")],
    model_path: Annotated[Path, typer.Option("--model", help="model file")] = Path(
        "models/alexnet.pt"
    ),
    top: Annotated[int, typer.Option(min=1, help="classes to show per image")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """Top classes of each image with the pipeline's preprocessing and 10-crop
    averaging. A file that cannot be read gets one error line; the others are still
    predicted, and the exit status is 1."""
    import json

    from alexnet.predict import predict as run_predict

    with _user_errors():
        prepare = _params(params_path).prepare
        options = {
            "size": prepare.size,
            "quality": prepare.quality,
            "resample": prepare.resample,
            "max_pixels": prepare.max_pixels,
        }
        results = run_predict(images, model_path, top, device, options)
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {"path": r.path, **({"error": r.error} if r.error else {"predictions": r.top})}
                    for r in results
                ],
                indent=2,
            )
        )
    for result in results:
        if result.error:
            console.print(f"error: {result.path}: {result.error}", markup=False, highlight=False)
        elif not as_json:
            typer.echo(result.path)
            for entry in result.top:
                typer.echo(f"  {entry['probability']:7.2%}  {entry['name']} ({entry['wnid']})")
    if any(result.error for result in results):
        raise typer.Exit(1)


@app.command()
def serve(params_path: ParamsOption = Path("params.yaml")) -> None:
    """Serve the Prefect deployments of this repository: one per stage, `pipeline` and
    `retrain` (cron from params `serve`). Each runs `dvc repro`, so runs started from
    the UI keep dvc.lock true. Needs a Prefect server: `prefect server start`, then
    PREFECT_API_URL=http://127.0.0.1:4200/api. Stop with Ctrl-C."""
    from prefect.settings import PREFECT_API_URL

    with _user_errors():
        params = _params(params_path)
        if not (os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()):
            raise AlexnetError(
                "serve needs a Prefect server: run `prefect server start` and set "
                "PREFECT_API_URL=http://127.0.0.1:4200/api"
            )
        if not Path("dvc.yaml").exists():
            raise AlexnetError("serve runs in the repository: no dvc.yaml in this folder")
        from flows.serve import serve_all

        serve_all(Path.cwd(), params.serve)


@app.command()
def doctor() -> None:
    """Print what the pipeline runs on: PIL (pillow-simd?), libjpeg-turbo, torch and CUDA
    devices, and which Prefect API flows report to."""
    from alexnet.doctor import facts

    rows = facts()
    api = os.environ.get("PREFECT_API_URL")
    if api is None:
        from prefect.settings import PREFECT_API_URL

        api = PREFECT_API_URL.value()
    rows["Prefect API"] = api or "none set: each run starts a temporary local server"
    width = max(map(len, rows))
    for key, value in rows.items():
        typer.echo(f"{key:<{width}}  {value}")


def main() -> None:  # pragma: no cover - console entry for `python -m alexnet.cli`
    app(prog_name="alexnet", args=sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
