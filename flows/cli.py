"""`alexnet`: the command line of the pipeline.

The six stage commands come from the table `flows.stages.STAGES` (the same commands DVC
runs as `python -m flows.<stage>`); besides them `predict`, `report`, `serve`, `param`
and `doctor`. Flows and the library are imported only by the command that needs them, so
`alexnet --help` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from alexnet.errors import AlexnetError
from alexnet.params import DEFAULT_FILE, DEFAULTS, DEVICE_HINT, PREDICT_BATCH
from alexnet.runtime import configure
from flows.stages import STAGES, ParamsOption, command, console, load, user_errors

app = typer.Typer(
    help="AlexNet (Krizhevsky et al. 2012) as a reproducible pipeline: synth -> prepare -> "
    "stats -> pack -> train -> evaluate. Run the whole chain with `dvc repro`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
for _stage in STAGES.values():
    app.command(name=_stage.name)(command(_stage))


@app.command(
    help="Top classes of each image, prepared as the model's data was (the model file says "
    "how) and averaged over the 10 crops. Reads only the model file. A file that cannot be "
    "read gets one error line; the others are still predicted, and the exit status is 1."
)
def predict(
    images: Annotated[
        list[Path], typer.Argument(metavar="IMAGE", help="image files (any format PIL reads)")
    ],
    model_path: Annotated[Path, typer.Option("--model", help="model file")] = Path(
        STAGES["train"].path("model_path").default
    ),
    top: Annotated[int, typer.Option(min=1, help="classes to show per image")] = 5,
    batch: Annotated[
        int, typer.Option(min=1, help="images a forward pass takes (their 10 crops each)")
    ] = PREDICT_BATCH,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    device: Annotated[str, typer.Option(help=DEVICE_HINT)] = "cpu",
    plugins: Annotated[
        list[str] | None,
        typer.Option(
            "--plugin",
            help="allow this PIL plugin module to be imported: one the model file's "
            "preparation names (its params prepare.plugins; importing runs its code, so "
            "none is imported unless named here), or one more format reader",
        ),
    ] = None,
    file_timeout: Annotated[
        float,
        typer.Option(
            min=0.1,
            help="seconds a file may keep the image decoder (in a process of its own) "
            "before it is given up as one that hangs it",
        ),
    ] = DEFAULTS.prepare.file_timeout,
) -> None:
    from alexnet.predict import predict as run_predict

    rows, failed = [], False
    arguments = (model_path, top, device, plugins or (), batch, file_timeout)
    with user_errors():  # each printed as it comes (the JSON whole, at the end)
        for result in run_predict(images, *arguments):
            failed |= bool(result.error)
            if result.error:
                line = f"error: {result.path}: {result.error}"
                console.print(line, markup=False, highlight=False)
            if as_json:
                answer = {"error": result.error} if result.error else {"predictions": result.top}
                rows.append({"path": result.path, **answer})
            elif not result.error:
                typer.echo(result.path)
                for entry in result.top:
                    typer.echo(f"  {entry['probability']:7.2%}  {entry['name']} ({entry['wnid']})")
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    if failed:
        raise typer.Exit(1)


@app.command(
    help="Serve the Prefect deployments of prefect.yaml from this process (one machine, no "
    "work pools): one per stage, `pipeline` and `retrain` (cron from params `serve`). Each "
    "runs `dvc repro`, so a run started from the UI leaves dvc.lock matching what it "
    "made. Needs a Prefect server: `prefect server start`, then `export "
    "PREFECT_API_URL=http://127.0.0.1:4200/api`. Stop with Ctrl-C. Reads the "
    "repository's params.yaml, as the runs' `dvc repro` does."
)
def serve() -> None:
    from prefect.settings import PREFECT_API_URL

    with user_errors():
        if not Path("dvc.yaml").exists():
            raise AlexnetError("serve runs in the repository: no dvc.yaml in this folder")
        params = load(None)  # no --params: the runs (dvc repro) read this file, so must serve
        api = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
        if not api:
            raise AlexnetError(
                "serve needs a Prefect server: run `prefect server start` and `export "
                "PREFECT_API_URL=http://127.0.0.1:4200/api`"
            )
        from flows.serve import check_schedule, serve_all
        from flows.server import check_api

        check_schedule(params, DEFAULT_FILE)
        check_api(api, temporary=False)
        serve_all(Path.cwd(), params)


@app.command(
    help="Print one parameter's value, as validated (defaults filled in), e.g. "
    "`alexnet param serve.retrain_cron` (how prefect.yaml's build steps read the cron)."
)
def param(
    key: Annotated[str, typer.Argument(metavar="KEY", help="section.name, as in params.yaml")],
    params_path: ParamsOption = None,
) -> None:
    from alexnet.params import param_text

    with user_errors():
        params = load(params_path)
        text = param_text(params, key)
        if key.startswith("serve."):  # what prefect deploy schedules: checked as Prefect will
            from flows.serve import check_schedule

            check_schedule(params, str(params_path or DEFAULT_FILE))
    typer.echo(text)


@app.command(
    help="Write one self-contained HTML page of the run: the evaluation, the training "
    "curves, section 6.1's figures (conv1's kernels, top-5 gallery, nearest neighbours) "
    "and the params the training run recorded. It needs no network to open; send it as "
    "one file."
)
def report(
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write")] = Path(
        "report.html"
    ),
    metrics: Annotated[Path, typer.Option(help="the stages' metrics folder")] = Path(
        STAGES["evaluate"].path("metrics").default
    ),
) -> None:
    from alexnet.report import write_report

    with user_errors():
        written = write_report(metrics, out)
    console.print(f"report: {written}", highlight=False)


@app.command(
    help="Print what the pipeline runs on: the CPU, PIL (pillow-simd?) and its codecs (with "
    "the package that provides each missing one), torch and its CUDA devices, the Prefect "
    "API flows report to, and where train keeps its checkpoint."
)
def doctor() -> None:
    from prefect.settings import PREFECT_API_URL

    from alexnet.doctor import facts

    rows = facts()
    api = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    rows["Prefect API"] = api or "none set: each run starts a temporary local server"
    checkpoint = STAGES["train"].path("checkpoint")
    rows["train checkpoint"] = checkpoint.from_environment() or (
        f"{checkpoint.default} (beside the model file; {checkpoint.envvar} not set: "
        "a Prefect worker's run loses it with its temporary clone)"
    )
    width = max(map(len, rows))
    for key, value in rows.items():
        typer.echo(f"{key:<{width}}  {value}")


def main() -> None:
    """The console script `alexnet`."""
    configure()
    app(prog_name="alexnet", args=sys.argv[1:])


if __name__ == "__main__":
    main()
