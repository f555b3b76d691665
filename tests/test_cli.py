"""The `alexnet` command line: help, doctor, one-line errors, a real run."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import typer
from typer.testing import CliRunner

from flows.cli import app
from flows.stages import STAGES
from tests.helpers import REPO, free_port, jpeg, make_imagefolder, run_python

runner = CliRunner()


def alexnet(*args: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "flows.cli", *args]
    env = {**(env or os.environ), "PYTHONPATH": str(REPO)}  # flows/ from any folder
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)


COMMANDS = {  # command: words its help must say
    "synth": "demo dataset",
    "prepare": "centre-crop it square",
    "stats": "mean image",
    "pack": "LMDB",
    "train": "paper's recipe",
    "evaluate": "10-crop",
    "predict": "Reads only the model file",
    "report": "self-contained HTML page",
    "serve": "deployments of prefect.yaml",
    "param": "one parameter's value",
    "doctor": "what the pipeline runs on",
}


def test_help_lists_every_command_with_its_purpose():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    listed = {c.name for c in typer.main.get_command(app).commands.values()}
    assert listed == set(COMMANDS)
    for command, words in COMMANDS.items():
        help_text = " ".join(runner.invoke(app, [command, "--help"]).output.split())
        assert words in help_text, command


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_command_shows_the_tables_default_paths(stage):
    text = " ".join(runner.invoke(app, [stage, "--help"]).output.split())
    for arg in STAGES[stage].paths:
        shown = f"params {arg.default}" if arg.from_params else arg.default
        assert shown in text, (stage, arg.name)
    assert ("--workers" in text) == STAGES[stage].parallel
    # its arguments named as the README's command list names them
    arguments = " ".join(f"[{arg.metavar}]" for arg in STAGES[stage].paths if not arg.option)
    assert f"[OPTIONS] {arguments}" in text, stage
    assert f"alexnet {stage} {arguments} " in (REPO / "README.md").read_text(), stage


def test_a_path_not_given_stands_beside_the_one_given():
    # `evaluate /big/lmdb/val model.pt` searched the neighbours in the repository's
    # data/lmdb/train; `train ... /runs/a/alexnet.pt` checkpointed in its models/
    from alexnet.params import DEFAULTS
    from flows.stages import resolve_paths

    evaluate = resolve_paths(STAGES["evaluate"], {"val": Path("/big/lmdb/val")}, DEFAULTS)
    assert evaluate["train"] == "/big/lmdb/train" and evaluate["metrics"] == "metrics"
    model = {"model_path": Path("/runs/a/alexnet.pt")}
    assert resolve_paths(STAGES["train"], model, DEFAULTS)["checkpoint"] == (
        "/runs/a/checkpoints/train.pt"
    )
    here = resolve_paths(STAGES["evaluate"], {"val": Path(".")}, DEFAULTS)["train"]
    assert here == str(Path.cwd().parent / "train")  # not ./train, inside VAL
    both = {"val": Path("/v/val"), "train": Path("/t/train")}
    assert resolve_paths(STAGES["evaluate"], both, DEFAULTS)["train"] == "/t/train"
    chain = {arg.name: arg.default for arg in STAGES["evaluate"].paths}
    assert resolve_paths(STAGES["evaluate"], {}, DEFAULTS) == chain


def test_param_prints_a_validated_value_and_names_a_wrong_key(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("serve:\n  retrain_cron: '15 4 * * 2'\n")
    result = runner.invoke(app, ["param", "serve.retrain_cron", "-p", str(params)])
    assert result.exit_code == 0 and result.output == "15 4 * * 2\n"
    default = runner.invoke(app, ["param", "serve.late_after_minutes", "-p", str(params)])
    assert default.output == "60\n"  # the schema's default fills in
    wrong = runner.invoke(app, ["param", "serve.cron", "-p", str(params)])
    assert wrong.exit_code == 1 and "no parameter 'serve.cron'" in wrong.output


def test_brackets_in_a_key_or_path_are_printed_as_they_are(tmp_path):
    # rich would read "[/x]" as a closing tag (a traceback) and drop "[draft]" as a style
    for key in ("train.[/x]", "train.[draft]lr"):
        wrong = runner.invoke(app, ["param", key, "-p", str(tmp_path / "none.yaml")])
        assert wrong.exit_code == 1
    missing = tmp_path / "[draft]" / "p.yaml"
    wrong = runner.invoke(app, ["param", "train.lr", "-p", str(missing)])
    assert wrong.exit_code == 1 and wrong.output == f"error: {missing}: no such params file\n"
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.01\n")
    for key in ("train.[/x]", "train.[draft]lr"):
        wrong = runner.invoke(app, ["param", key, "-p", str(tmp_path / "params.yaml")])
        assert wrong.exit_code == 1 and wrong.output.startswith(f"error: no parameter '{key}'")


def test_a_command_run_where_no_params_yaml_is_says_it_takes_the_defaults(tmp_path):
    # In another folder the paper's values apply (90 epochs, batch 128): said, not silent.
    result = alexnet("param", "train.epochs", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout == "90\n"
    assert result.stderr == (
        f"params: no params.yaml in {tmp_path}: every key takes its schema default "
        "(the paper's recipe on a CPU, not the demo's; params.imagenet.yaml is ImageNet's)\n"
    )
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 3\n")
    result = alexnet("param", "train.epochs", cwd=tmp_path)
    assert (result.stdout, result.stderr) == ("3\n", "")


def test_param_prints_values_as_yaml_reads_them(tmp_path):
    # JSON for anything not a string (YAML reads it too): not Python's ('cpu',) or True
    for key, shown in [
        ("train.device", '["cpu"]'),
        ("model.lrn", "true"),
        ("compute.scheduler", "null"),
        ("train.lr", "0.01"),
    ]:
        (tmp_path / "params.yaml").write_text("train: {}\n")  # every default
        result = runner.invoke(app, ["param", key, "-p", str(tmp_path / "params.yaml")])
        assert result.output == f"{shown}\n", key


@pytest.mark.parametrize(
    "section, message",
    [
        ("retrain_cron: every monday", 'serve.retrain_cron: Invalid cron string: "every monday"'),
        ("timezone: Mars/Base", 'serve.timezone: Invalid timezone: "Mars/Base"'),
    ],
)
def test_a_schedule_prefect_cannot_read_is_one_line(tmp_path, section, message):
    # Valid YAML of the right type, but a deployment's schedule would fail with a
    # traceback in `alexnet serve` and in `prefect deploy` (which reads it with `param`).
    params = tmp_path / "params.yaml"
    params.write_text(f"serve:\n  {section}\n")
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # not reached
    key = "serve." + section.split(":")[0]
    # (serve reads the folder's params.yaml, as the runs' `dvc repro` does, there)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    for args, source in ((["param", key, "-p", str(params)], params), (["serve"], "params.yaml")):
        result = alexnet(*args, env=env, cwd=tmp_path)
        assert result.returncode == 1 and result.stdout == "", result.stderr[-2000:]
        assert result.stderr.startswith(f"error: {source}: {message}"), result.stderr
        assert result.stderr.count("\n") == 1, result.stderr


def test_a_prefect_server_that_does_not_answer_is_one_line(tmp_path):
    # PREFECT_API_URL set, its server stopped: Prefect retried, then a page of traceback
    url = f"http://127.0.0.1:{free_port()}/api"
    env = {**os.environ, "PREFECT_API_URL": url}
    for args in (["synth", str(tmp_path / "raw")], ["serve"]):
        result = alexnet(*args, env=env)
        assert result.returncode == 1 and not (tmp_path / "raw").exists()
        line = f"error: PREFECT_API_URL: no Prefect server answers at {url}"
        assert result.stderr.startswith(line), result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        # a temporary server is a remedy for a stage's run, not for serve (which needs one)
        temporary = "or unset PREFECT_API_URL for a temporary one" in result.stderr
        assert temporary == (args[0] != "serve"), result.stderr


@pytest.mark.parametrize("stage", ["synth", "prepare", "stats", "pack", "train", "evaluate"])
def test_a_stage_refused_before_any_work_prints_its_one_line_alone(tmp_path, stage):
    # Refused once Prefect's server had started and a flow run was made: seven lines, the
    # reason twice (in the run's Failed state), the error line not the last, ~9 s.
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    mine = tmp_path / "mine"  # a folder of the user's files, named as an output
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    missing = tmp_path / "missing"
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 1\n")  # (no line about it)
    args, reason = {
        "synth": ([mine], f"{mine}: "),
        "prepare": ([missing, tmp_path / "out"], f"{missing}: no such dataset folder"),
        "stats": ([missing, tmp_path / "out"], f"{missing}: no shard-*.tar files"),
        "pack": ([missing, tmp_path / "lmdb"], f"{missing / 'classes.json'}: no such file"),
        "train": ([missing, missing, tmp_path / "m.pt"], f"{missing}: no such stats folder"),
        "evaluate": ([missing, tmp_path / "m.pt"], f"{missing}: no LMDB store here"),
    }[stage]
    args = list(map(str, args))
    # As `alexnet STAGE`, Prefect unimportable (the stage's `refuse`, in alexnet/STAGE.py,
    # comes before it: ~2.5 s of a CPU), and as DVC runs it, `python -m flows.STAGE`
    # (whose module imports Prefect), with no server started.
    as_command = f"import os; os.chdir({str(tmp_path)!r}); from flows.cli import app; "
    as_command += f"app({[stage, *args]!r})"
    for result in (
        run_python(as_command, env, blocked=("prefect",)),
        subprocess.run(
            [sys.executable, "-m", f"flows.{stage}", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        ),
    ):
        assert result.returncode == 1 and result.stdout == "", result.stderr
        assert result.stderr.startswith(f"error: {reason}"), result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_a_device_this_machine_lacks_is_one_line_naming_its_param_before_any_work(tmp_path):
    # Found once the flow ran: the server started, the reason twice, no param named, and
    # train left an empty checkpoints folder.
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    (tmp_path / "params.yaml").write_text(
        "train:\n  device: [cuda:99]\nevaluate:\n  device: cuda:99\n"
    )
    missing = tmp_path / "missing"
    for stage, args in (
        ("train", [missing, missing, tmp_path / "m" / "m.pt"]),
        ("evaluate", [missing, tmp_path / "m.pt"]),
    ):
        result = alexnet(stage, *map(str, args), env=env, cwd=tmp_path)
        assert result.returncode == 1 and result.stdout == "", result.stderr
        assert result.stderr.startswith(f"error: {stage}.device: device cuda:99 requested")
        assert result.stderr.count("\n") == 1, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_doctor_names_the_imaging_library_and_devices(monkeypatch):
    monkeypatch.delenv("ALEXNET_CHECKPOINT", raising=False)
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0
    for field in ("PIL", "SIMD resize", "libjpeg-turbo", "torch", "CUDA devices", "Prefect API"):
        assert field in result.output
    assert re.search(r"NVIDIA DALI +yes \(\d", result.output)  # the [dali] extra
    assert ("pillow-simd" in result.output) == (".post" in __import__("PIL").__version__)
    assert re.search(r"train checkpoint +models/checkpoints/train.pt \(beside", result.output)
    monkeypatch.setenv("ALEXNET_CHECKPOINT", "/shared/alexnet/train.pt")  # a worker's
    result = runner.invoke(app, ["doctor"])
    assert re.search(r"train checkpoint +/shared/alexnet/train.pt\n", result.output)


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("prepare:\n  qualty: 80\n", "unknown key 'prepare.qualty'"),
        ("prepare:\n  size: big\n", "prepare.size: Input should be a valid integer"),
    ],
)
def test_bad_params_are_one_line_and_exit_1(tmp_path, yaml_text, message):
    (tmp_path / "params.yaml").write_text(yaml_text)
    result = alexnet(
        "prepare", str(tmp_path), str(tmp_path / "out"), "-p", str(tmp_path / "params.yaml")
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-p", "params.imagenet.yml"], "error: params.imagenet.yml: no such params file"),
        (["--workers", "-1"], "error: --workers: Input should be greater"),
        (
            ["--scheduler", "tcp://127.0.0.1:1"],  # nothing listens on port 1
            "error: compute.scheduler: no Dask scheduler answers at tcp://127.0.0.1:1 (",
        ),
    ],
)
def test_a_wrong_command_line_is_one_error_line_before_any_work(tmp_path, args, message):
    result = alexnet("synth", str(tmp_path / "raw"), *args)
    assert result.returncode == 1 and not (tmp_path / "raw").exists()
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr


def test_an_output_folder_of_the_users_files_is_refused_and_kept(tmp_path, prefect_server):
    # synth, stats and pack replace their output folders whole, prepare fills its own: named by
    # mistake as a folder of the user's files (here pack's `out` the same as its input,
    # prepare's the raw dataset), nothing may be lost or added.
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    mine = tmp_path / "mine"
    (mine / "train").mkdir(parents=True)
    (mine / "train" / "shard-00000.tar").write_bytes(b"the user's")
    (mine / "thesis.txt").write_text("the user's")
    raw = make_imagefolder(tmp_path / "raw", classes=2, train=1, val=1)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for args, target in (
        (["synth", str(mine)], mine),
        (["pack", str(mine / "train"), str(mine)], mine / "train"),
        (["stats", str(mine / "train"), str(mine)], mine),
        (["prepare", str(raw), str(mine)], mine),
    ):
        result = alexnet(*args, env=env)
        assert result.returncode == 1, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert errors == [
            f"error: {target}: holds files and not the .alexnet-output mark of the output "
            "folders that alexnet replaces or updates; name a new or empty folder, or remove "
            "this one (one alexnet wrote before it marked them: touch "
            f"{target / '.alexnet-output'})"
        ]
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_an_output_at_or_inside_an_input_is_refused_before_any_work(tmp_path):
    # `prepare RAW RAW/train/x` made a class of its own shards on the next run; pack and
    # stats wrote into prepare's output. Refused before the Prefect server starts.
    raw = make_imagefolder(tmp_path / "raw", classes=2, train=1, val=1)
    prepared = tmp_path / "prepared"
    (prepared / "train").mkdir(parents=True)
    (tmp_path / "model.pt").write_bytes(b"a model")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for args, out, where, name, source in (
        (["prepare", raw, raw / "train" / "x"], raw / "train" / "x", "is inside", "RAW", raw),
        (["prepare", raw, raw], raw, "is", "RAW", raw),
        (
            ["pack", prepared, prepared / "lmdb"],
            prepared / "lmdb",
            "is inside",
            "PREPARED",
            prepared,
        ),
        (
            ["stats", prepared / "train", prepared / "train" / "s"],
            prepared / "train" / "s",
            "is inside",
            "TRAIN",
            prepared / "train",
        ),
        (
            ["evaluate", raw, tmp_path / "model.pt", "--metrics", raw / "m"],
            raw / "m",
            "is inside",
            "VAL",
            raw,
        ),
    ):
        result = alexnet(*map(str, args))
        assert result.returncode == 1, result.stderr[-2000:]
        assert result.stderr.splitlines()[-1] == (
            f"error: {out}: {where} the input {name} ({source}); name an output outside it"
        )
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
        assert not (raw / "train" / "x").exists() and not (prepared / "lmdb").exists()


def test_a_refusal_of_paths_alone_comes_before_prefect_is_imported(tmp_path):
    # Prefect is ~2 s of a CPU to import: `prepare RAW RAW` is refused in well under a
    # second, the error line printed without it.
    raw = make_imagefolder(tmp_path / "raw", classes=2, train=1, val=1)
    code = f"from flows.cli import app; app(['prepare', {str(raw)!r}, {str(raw)!r}])"
    done = run_python(code, blocked=("prefect",))
    assert done.returncode == 1, done.stderr[-2000:]
    line = f"error: {raw}: is the input RAW ({raw}); name an output outside it"
    assert done.stderr.splitlines()[-1] == line


def test_an_error_of_the_operating_system_is_one_line(tmp_path, prefect_server):
    # A read-only folder, a full disk, a name too long: the user's to fix, so one line
    # naming the path, as an error of ours (the command's exit status is 1 either way).
    out = tmp_path / ("x" * 300)
    result = alexnet("synth", str(out), env={**os.environ, "PREFECT_API_URL": prefect_server})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {out}: File name too long"]


def test_the_line_of_an_error_of_the_operating_system_names_its_paths():
    from alexnet.errors import is_user_error, user_line

    assert user_line(OSError(30, "Read-only file system", "/x")) == "/x: Read-only file system"
    moved = OSError(18, "Invalid cross-device link", "/a", None, "/b")  # as os.replace
    assert user_line(moved) == "/a -> /b: Invalid cross-device link"
    assert user_line(TimeoutError("no answer\nin 5 s")) == "TimeoutError: no answer in 5 s"
    # An OSError without an errno is a library's or a bug's, not the system's refusal:
    # its traceback is kept.
    assert is_user_error(OSError(30, "Read-only file system"))
    assert not is_user_error(TimeoutError("no answer")) and not is_user_error(ValueError())


def test_only_the_data_stages_use_the_cluster_the_params_name(tmp_path, prefect_server):
    # With compute.scheduler in params.yaml (the data stages on a cluster), train and
    # evaluate, which map no tasks, must neither need the cluster up nor start one.
    from prefect import flow

    from alexnet.params import Params, with_compute
    from flows.stages import run_stage

    @flow
    def stub(val: str, model_path: str, train: str, metrics: str, evaluate, compute) -> dict:
        return {"val": val, "runner": type(stub_runner()).__name__}

    def stub_runner():
        from prefect.context import FlowRunContext

        return FlowRunContext.get().task_runner

    params = with_compute(Params(), scheduler="tcp://127.0.0.1:1")  # nothing listens
    paths = {"val": "v", "model_path": "m", "train": "t", "metrics": "x"}
    result = run_stage(STAGES["evaluate"], paths, params, stub)
    assert result == {"val": os.path.abspath("v"), "runner": "ThreadPoolTaskRunner"}


def test_the_command_line_can_say_null_to_a_scheduler_the_params_name(tmp_path):
    # `--scheduler null`, as the option's help says: the process pool for this run
    from flows.stages import load

    path = tmp_path / "params.yaml"
    path.write_text("compute:\n  scheduler: local\n")
    assert load(path).compute.scheduler == "local"
    assert load(path, scheduler="null").compute.scheduler is None
    assert load(path, workers=3).compute.scheduler == "local"  # left out: the file's


def test_report_into_a_folder_is_one_error_line(tmp_path):
    (tmp_path / "metrics").mkdir()
    result = runner.invoke(
        app, ["report", "-o", str(tmp_path), "--metrics", str(tmp_path / "metrics")]
    )
    assert result.exit_code == 1 and "a folder, where this output is a file" in result.output


def test_report_replaces_an_earlier_report_but_no_other_file(tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "train.json").write_text('{"epochs": 1}')
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 3\n")
    (tmp_path / "old.html").write_text("<!DOCTYPE html>\n<p>an earlier report</p>\n")
    outputs = {}
    for name, code in (("params.yaml", 1), ("old.html", 0), ("new.html", 0)):
        args = ["report", "-o", str(tmp_path / name), "--metrics", str(tmp_path / "metrics")]
        result = runner.invoke(app, args)
        assert result.exit_code == code, result.output
        outputs[name] = " ".join(result.output.split())
    assert "params.yaml: a file that is not an HTML page; name another" in outputs["params.yaml"]
    assert (tmp_path / "params.yaml").read_text() == "train:\n  epochs: 3\n"
    assert (tmp_path / "old.html").read_text() == (tmp_path / "new.html").read_text()


def test_missing_dataset_is_one_error_line(tmp_path, prefect_server):
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    result = alexnet("prepare", str(tmp_path / "nowhere"), str(tmp_path / "out"), env=env)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    hint = "(`alexnet synth` makes the demo's)"
    assert errors == [f"error: {tmp_path / 'nowhere'}: no such dataset folder {hint}"]
    assert "Traceback" not in result.stderr


def test_prepare_command_end_to_end(tmp_path, prefect_server):
    raw = make_imagefolder(tmp_path / "raw", classes=2, train=3, val=1)
    (raw / "train" / "n00000001" / "empty.JPEG").write_bytes(b"")
    (tmp_path / "params.yaml").write_text("prepare:\n  max_skipped: 0.2\ncompute:\n  workers: 1\n")
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    result = alexnet(
        "prepare", str(raw), str(tmp_path / "out"), "-p", str(tmp_path / "params.yaml"), env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "prepare: 8 kept, 0 converted, 1 skipped of 9 files" in result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["skipped_files"] == [
        {"path": "train/n00000001/empty.JPEG", "reason": "empty file"}
    ]


@pytest.mark.parametrize("stage", ["stats", "pack"])
def test_a_damaged_shard_stops_the_stage_with_one_line(tmp_path, prefect_server, stage):
    # Both fail in a worker process (stats decodes, pack reads by offset): the user sees
    # the task's error once, as one line, and no traceback from the worker's log.
    from alexnet.shards import Record, write_shard

    prepared = tmp_path / "prepared"
    for split in ("train", "val"):
        (prepared / split).mkdir(parents=True)
        for s in range(2):
            records = [Record(f"n{i}/img_{s}{i}", jpeg(224, 224, i), i) for i in range(2)]
            if (split, s) == ("train", 1):
                records[1] = Record("n1/img_11", b"GIF89a not a jpeg", 1)
            write_shard(prepared / split / f"shard-{s:05d}.tar", records, {})
    classes = [{"index": i, "wnid": f"n{i}", "name": f"c{i}"} for i in range(2)]
    (prepared / "classes.json").write_text(json.dumps(classes))
    params = tmp_path / "params.yaml"
    params.write_text("prepare:\n  size: 224\ncompute:\n  workers: 1\npack:\n  batch: 2\n")
    paths = {
        "stats": (prepared / "train", tmp_path / "stats"),
        "pack": (prepared, tmp_path / "lmdb"),
    }
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    result = alexnet(stage, *map(str, paths[stage]), "-p", str(params), env=env)
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    shard = prepared / "train" / "shard-00001.tar"
    assert errors == [f"error: {shard}: member n1/img_11.jpg is not a JPEG (no JPEG start marker)"]
    assert "Traceback" not in result.stderr
    assert not [p for p in paths[stage][1].rglob("*") if p.is_file()]  # nothing half-written


@pytest.mark.parametrize(
    "scheduler, when",
    [([], "Task run"), (["--scheduler", "local"], "Task run"), ([], "Beginning flow run")],
    ids=["pool", "dask", "pool-starting"],
)
def test_ctrl_c_stops_a_stage_in_seconds_with_one_line(tmp_path, scheduler, when):
    # A Ctrl-C at the terminal is SIGINT to every process of the foreground group. It
    # killed Prefect's temporary server and a pool worker with the stage, which then
    # retried the dead API for minutes, and a second Ctrl-C did not help (measured: still
    # running after 12 minutes); Dask's workers each printed a traceback. Now the stage
    # alone stops, its queued tasks cancelled. "pool-starting": while the pool's workers
    # still import (seconds, before their initializer), where each printed a traceback.
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    log = tmp_path / "log"
    # The demo's 10 tasks on 2 workers (on many cores all would be done at once), of
    # images a sixth of the demo's size: those running at the Ctrl-C end in ~1 s, not ~6 s.
    (tmp_path / "params.yaml").write_text("synth:\n  max_side: 400\n")
    command = [sys.executable, "-m", "flows.cli", "synth", str(tmp_path / "raw"), *scheduler]
    command += ["--workers", "2", "-p", str(tmp_path / "params.yaml")]
    with open(log, "w") as stream:
        stage = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=stream, stderr=stream, start_new_session=True
        )
    try:
        for _ in range(1200):  # until its first task is done (the pool busy), or the flow
            if when in log.read_text() or stage.poll() is not None:  # begins (it starts)
                break
            time.sleep(0.1)
        assert stage.poll() is None, log.read_text()[-3000:]  # it ended before the Ctrl-C
        os.killpg(stage.pid, signal.SIGINT)
        returncode = stage.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(stage.pid, signal.SIGKILL)
    text = log.read_text()
    assert returncode == 130, text[-3000:]
    assert "synth: interrupted; run again to continue" in text and "Traceback" not in text
    if not scheduler:  # no half-written output (Dask cannot wait for a cancelled task
        # that was running: its temporary may stay, for the next run to remove)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["log", "params.yaml"]
    assert not (tmp_path / "raw").exists()
    (port,) = set(re.findall(r"temporary server on http://127.0.0.1:(\d+)", text))
    with pytest.raises(ConnectionRefusedError):  # and the server went with it
        socket.create_connection(("127.0.0.1", int(port)), timeout=5).close()


def living(group: int) -> list[int]:
    """The processes of a process group that still run (not zombies)."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            if os.getpgid(process.pid) == group and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process.pid)
    return found


def test_a_stage_killed_outright_takes_its_server_and_workers_with_it(tmp_path):
    # The server runs in a session of its own (a Ctrl-C to the stage's group must not
    # reach it), so no signal to the stage's group reaches it either. A stage killed by
    # SIGKILL (the OOM killer) runs no exit handler: Linux stops the server instead, and
    # the pool's workers, which stayed idle (~130 MB each) with their decoder children.
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    log = tmp_path / "log"
    command = [sys.executable, "-m", "flows.cli", "synth", str(tmp_path / "raw")]
    command += ["--workers", "2"]
    with open(log, "w") as stream:
        stage = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=stream, stderr=stream, start_new_session=True
        )
    try:
        for _ in range(1200):  # until its first task is done: the server answers
            if "Task run" in log.read_text() or stage.poll() is not None:
                break
            time.sleep(0.1)
        (port,) = set(re.findall(r"temporary server on http://127.0.0.1:(\d+)", log.read_text()))
        socket.create_connection(("127.0.0.1", int(port)), timeout=5).close()
        stage.kill()  # the stage alone, not its group
        stage.wait(timeout=30)
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", int(port)), timeout=5).close()
            except ConnectionRefusedError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the temporary server outlived its killed stage by 30 s")
        for _ in range(300):
            if not living(stage.pid):
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"processes {living(stage.pid)} outlived their stage by 30 s")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(stage.pid, signal.SIGKILL)


# A stage's temporary server, as `run_stage` gets it; the stage then prints the API it
# uses, the API a thread of its own started later sees (as Prefect's log, event and
# pool-forwarding threads are), and whether it imported Prefect's server, and keeps its
# server until its input closes.
STAGE_WITH_A_SERVER = """
import sys, threading
from prefect.settings import PREFECT_API_URL
from flows.server import prefect_api
with prefect_api() as url:
    seen = []
    thread = threading.Thread(target=lambda: seen.append(PREFECT_API_URL.value()))
    thread.start()
    thread.join()
    print(url, seen[0], "prefect.server.api.server" in sys.modules, flush=True)
    sys.stdin.read()
"""


def test_two_stages_starting_at_once_each_get_a_temporary_server_of_their_own(tmp_path):
    # Prefect took the first answer on the port it picked as its own server's: two stages
    # that started at once could pick the same port, the second's server then failed to
    # bind, and that stage used the first's, which stopped with the first stage. Now the
    # port is the kernel's pick, bound before the server starts.
    # Prefect's threads, started outside the stage's settings context, saw no API and
    # each started a temporary server of Prefect's own (left running when the thread's
    # process ended first). And the stage imports none of the server (~5 s of CPU here).
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    command = [sys.executable, "-c", STAGE_WITH_A_SERVER]

    def start(log: Path) -> subprocess.Popen:
        with log.open("w") as stream:
            pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": stream}
            return subprocess.Popen(command, cwd=REPO, env=env, text=True, **pipes)

    stages = [start(tmp_path / f"log{i}") for i in range(2)]

    def logs() -> list[str]:
        return [path.read_text()[-2000:] for path in sorted(tmp_path.iterdir())]

    try:
        lines = [stage.stdout.readline().split() for stage in stages]  # both serve now
        assert all(lines), logs()
        urls = [url for url, _, _ in lines]
        assert urls[0] != urls[1], (urls, logs())
        assert lines == [[url, url, "False"] for url in urls], logs()
        for url in urls:
            assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    finally:
        for stage in stages:
            stage.stdin.close()
        for stage in stages:
            try:
                stage.wait(timeout=60)
            except subprocess.TimeoutExpired:
                stage.kill()
    assert [stage.returncode for stage in stages] == [0, 0], logs()
    for url in urls:  # each stopped with its stage
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=10)


# An app whose first start fails as a server's does that lost the race to make a new
# database (its lifespan's startup fails: uvicorn exits with status 3), then Prefect's.
FAILS_ONCE = """
from pathlib import Path

def create_app():
    failed = Path(__file__).with_suffix(".failed")
    if failed.exists():
        from prefect.server.api.server import create_app

        return create_app()
    failed.touch()

    async def app(scope, receive, send):
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "migrations raced"})

    return app
"""


def test_a_temporary_server_that_fails_to_start_is_started_again(tmp_path, monkeypatch):
    import flows.server

    (tmp_path / "fails_once.py").write_text(FAILS_ONCE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(flows.server, "SERVER_APP", "fails_once:create_app")
    server = flows.server.TemporaryServer()
    try:
        server.start(timeout=90)
        assert (tmp_path / "fails_once.failed").exists()  # the first start failed
        assert httpx.get(f"{server.api_url}/health", timeout=10).status_code == 200
    finally:
        server.stop()


def test_the_temporary_servers_connections_send_at_once():
    # uvicorn takes a socket it is handed for a Unix one, and asyncio sets TCP_NODELAY
    # only on TCP sockets: each answer's body waited for the client's delayed
    # acknowledgement (measured: 51 ms an API call, 6 ms with the option). The option is
    # set on the socket handed over, and its connections inherit it.
    from flows.server import _bound

    listener = _bound(0)
    with listener, socket.fromfd(listener.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as served:
        served.listen()
        with socket.create_connection(listener.getsockname(), timeout=5):
            connection, _ = served.accept()
            with connection:
                assert connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_a_stage_error_is_the_last_word(tmp_path):
    # Prefect sent its last events at exit, with a warning after the error line; they
    # are sent first now. Only the temporary server's "Stopping" line may follow.
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    (tmp_path / "empty").mkdir()
    result = alexnet("stats", str(tmp_path / "empty"), str(tmp_path / "stats"), env=env)
    lines = result.stderr.splitlines()
    (at,) = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert lines[at] == f"error: {tmp_path / 'empty'}: no shard-*.tar files (run prepare first)"
    assert all("Stopping temporary server" in line for line in lines[at + 1 :]), lines[at:]


def test_an_error_a_library_made_of_a_ctrl_c_is_the_interrupted_line(
    tmp_path, prefect_server, monkeypatch
):
    # pydantic wraps a KeyboardInterrupt raised in a serializer (Prefect's first task
    # submit) as PydanticSerializationError: a traceback and status 1 after a Ctrl-C.
    import signal as signals

    from typer.testing import CliRunner

    from flows.stages import command
    from tasks.quiet import INTERRUPTED

    ctrl_c = [True, False]

    def flow(**arguments):
        if ctrl_c.pop(0):
            INTERRUPTED.set()  # as the stage's SIGINT handler does
        raise ValueError("Error calling function `_ser_model`: KeyboardInterrupt")

    app = typer.Typer()
    app.command(name="train")(command(STAGES["train"], flow))
    handler = signals.getsignal(signals.SIGINT)
    try:
        result = CliRunner().invoke(app, [str(tmp_path / "l"), str(tmp_path / "s")])
    finally:
        INTERRUPTED.clear()
        signals.signal(signals.SIGINT, handler)
    assert result.exit_code == 130, result.output
    assert "train: interrupted; run again to continue" in result.output
    result = CliRunner().invoke(app, [str(tmp_path / "l"), str(tmp_path / "s")])
    signals.signal(signals.SIGINT, handler)
    assert result.exit_code == 1 and not ctrl_c  # without a Ctrl-C it is an error
