"""params.yaml: the repo's file is valid, and bad files fail with one line naming the key."""

from __future__ import annotations

import re
from typing import Literal, get_args, get_origin

import pytest

from alexnet.params import (
    DEVICE_TYPES,
    PLAIN_DEVICE,
    Params,
    ParamsError,
    load_params,
    param_value,
    parse_params,
    with_compute,
)
from tests.helpers import REPO, run_python


@pytest.mark.parametrize("name", ["params.yaml", "params.imagenet.yaml"])
def test_repo_params_files_are_valid_and_complete(name):
    params = load_params(REPO / name)
    assert params.prepare.size == 256 and params.prepare.quality == 90
    # Every key of every section is written out in the file, so users see all knobs; and
    # DVC refuses to run a stage that lists a key its params.yaml lacks (the preset is
    # copied over params.yaml whole).
    import yaml

    written = yaml.safe_load((REPO / name).read_text())
    for section, model in Params.model_fields.items():
        assert set(written[section]) == set(model.annotation.model_fields), section


# Where each params file departs from the schema's defaults, on purpose (the file's
# comments say why): the demo's small budget, and ImageNet's paths and GPU settings.
DEPARTURES = {
    "params.yaml": {
        "prepare.shard_size",
        "model.dropout",
        "model.init",
        "train.epochs",
        "train.batch_size",
        "train.max_epochs_per_rate",
        "train.val_batch_size",
    },
    "params.imagenet.yaml": {
        "prepare.raw",
        "prepare.shard_size",
        "prepare.max_skipped",
        "pack.encoding",
        "pack.batch",
        "train.stop_at_last_plateau",
        "train.deterministic",
        "train.device",
        "train.sync_every",
        "train.val_batch_size",
        "train.channels_last",
        "train.loader_workers",
        "evaluate.batch_size",
        "evaluate.device",
        "evaluate.loader_workers",
        "evaluate.channels_last",
        "evaluate.neighbour_batch",
        "compute.window_mb",
    },
}


@pytest.mark.parametrize("name", sorted(DEPARTURES))
def test_repo_params_files_keep_every_other_default(name):
    # The files write every key out (above), so each is a copy of a schema default: a
    # default changed in alexnet/params.py must change them too, or fail here.
    written = load_params(REPO / name).model_dump(mode="json")
    defaults = Params().model_dump(mode="json")
    differ = {
        f"{section}.{key}"
        for section, values in defaults.items()
        for key, value in values.items()
        if written[section][key] != value
    }
    assert differ == DEPARTURES[name]


# Where the docs list the execution keys: (file, where the list starts, where it ends,
# the sections it lists)
EXECUTION_KEY_LISTS = [
    ("README.md", "The execution keys", "\n\n", ("train", "evaluate")),
    ("docs/design.md", "less the execution-only keys", ")", ("train",)),  # the stage table
    ("docs/design.md", "less its execution-only key", ")", ("evaluate",)),
    ("docs/design.md", "`EXECUTION_KEYS` of its schema", "\n\n", ("train", "evaluate")),
]


@pytest.mark.parametrize(("name", "start", "end", "sections"), EXECUTION_KEY_LISTS)
def test_the_docs_name_every_execution_key(name, start, end, sections):
    # A change to an execution key re-runs no stage: a user must be able to see which
    # keys those are, and a new one must not go unlisted.
    text = (REPO / name).read_text()
    first = text.index(start)
    listed = " ".join(text[first : text.index(end, first)].split())
    for section in sections:
        for key in Params.model_fields[section].annotation.EXECUTION_KEYS:
            assert f"`{key}`" in listed or f"`{section}.{key}`" in listed, (name, key)


def test_unknown_key_is_named():
    with pytest.raises(ParamsError, match=r"^params: unknown key 'prepare.qualty'$"):
        parse_params({"prepare": {"qualty": 80}})
    with pytest.raises(ParamsError, match="unknown key 'trian'"):
        parse_params({"trian": {}})


def test_wrong_type_is_named_with_value(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("prepare:\n  quality: high\n")
    with pytest.raises(ParamsError) as error:
        load_params(path)
    message = str(error.value)
    assert message.startswith(f"{path}: prepare.quality: ") and "'high'" in message
    assert "\n" not in message


def test_out_of_range_and_bad_choice():
    with pytest.raises(ParamsError, match="prepare.max_skipped"):
        parse_params({"prepare": {"max_skipped": 2}})
    with pytest.raises(ParamsError, match="prepare.resample"):
        parse_params({"prepare": {"resample": "nearest"}})
    # a threshold of 1 or more: no epoch ever improves, and the rate drops every plateau
    with pytest.raises(ParamsError, match="train.lr_threshold: Input should be less than 1"):
        parse_params({"train": {"lr_threshold": 1.0}})
    # an empty raw folder would read as the repository itself (then "inside its input")
    with pytest.raises(ParamsError, match="prepare.raw: String should have at least 1"):
        parse_params({"prepare": {"raw": ""}})


def test_prepared_images_smaller_than_the_crops_are_refused_naming_both_keys():
    refused = r"^params: prepare.size \(223\) is smaller than the crops of model.input_size "
    refused += r"\(224\)$"
    with pytest.raises(ParamsError, match=refused):
        parse_params({"prepare": {"size": 223}})
    with pytest.raises(ParamsError, match=r"\(226\) .* \(227\)$"):
        parse_params({"prepare": {"size": 226}, "model": {"input_size": 227}})
    assert parse_params({"prepare": {"size": 227}, "model": {"input_size": 227}})


def test_values_that_fail_only_later_are_refused_when_loaded():
    for address in ("local", "tcp://10.0.0.5:8786", "node7:8786", "tls://[::1]:8786", None):
        assert parse_params({"compute": {"scheduler": address}}).compute.scheduler == address
    for address in ("foo", "tcp://node7", "tcp://node7:port"):  # distributed needs the port
        with pytest.raises(
            ParamsError, match=rf"^params: compute.scheduler: .*\(got '{address}'\)$"
        ):
            parse_params({"compute": {"scheduler": address}})
    with pytest.raises(ParamsError, match=r"^params: synth: min_side \(500\) is larger than max"):
        parse_params({"synth": {"min_side": 500, "max_side": 200}})


def test_several_nodes_meeting_at_a_loopback_endpoint_are_refused_naming_both_keys():
    # Each node's loopback is its own: the nodes would wait for each other until
    # torchrun's join timeout.
    # 0.0.0.0 (a listener's any address, no host's): torch waited, then printed C++ frames
    unspecified = ("0.0.0.0:29400", "[::]:29400")
    for endpoint in (
        "localhost:29400",
        "127.0.1.1:29400",
        "[::1]:29400",
        "LOCALHOST",
        *unspecified,
    ):
        refused = (
            rf"^params: train: nnodes \(2\) needs an rdzv_endpoint .* '{re.escape(endpoint)}'$"
        )
        with pytest.raises(ParamsError, match=refused):
            parse_params({"train": {"nnodes": 2, "rdzv_endpoint": endpoint}})
    with pytest.raises(ParamsError, match=r"^params: train: rdzv_endpoint: The port number"):
        parse_params({"train": {"nnodes": 2, "rdzv_endpoint": "node0:http"}})
    assert parse_params({"train": {"nnodes": 2, "rdzv_endpoint": "node0:29400"}})
    assert parse_params({"train": {"nnodes": 2, "rdzv_endpoint": "10.0.0.1"}})
    assert parse_params({"train": {"nnodes": 1}}).train.rdzv_endpoint == "localhost:29400"


def test_devices_several_processes_cannot_share_are_refused():
    # DDP takes a model on one kind of device; an explicit GPU is every process's of a node
    for device in (["cuda:0", "cpu"], ["cpu", "cuda:0"]):
        with pytest.raises(ParamsError, match=r"^params: train: device .* mixes cpu and cuda"):
            parse_params({"train": {"device": device, "nproc_per_node": 2}})
    with pytest.raises(ParamsError, match=r"^params: train: device 'cuda:1' would be one GPU"):
        parse_params({"train": {"device": ["cuda:1"], "nproc_per_node": 2}})
    assert parse_params({"train": {"device": ["cuda:0", "cpu"]}})  # one process: two columns
    assert parse_params({"train": {"device": ["cuda"], "nproc_per_node": 2}})
    assert parse_params({"train": {"device": ["cuda:0", "cuda:1"], "nproc_per_node": 2}})
    two_nodes = {"nnodes": 2, "rdzv_endpoint": "node0:29400"}
    assert parse_params({"train": {"device": ["cuda:1"], **two_nodes}})  # one process a node


def test_two_devices_need_two_columns():
    # refused with the params, not a traceback after the stores and stats have loaded
    one_column = {"train": {"device": ["cpu", "cpu"]}, "model": {"columns": 1}}
    with pytest.raises(ParamsError, match=r"^params: train.device \['cpu', 'cpu'\] places"):
        parse_params(one_column)
    assert parse_params({**one_column, "train": {"device": ["cpu"]}})
    assert parse_params({**one_column, "model": {"columns": 2}})


def test_command_line_overrides_are_checked_as_the_files_values():
    assert with_compute(Params(), workers=3, scheduler="local").compute.workers == 3
    # a value typed is said as its option, as the user wrote it
    with pytest.raises(ParamsError, match=r"^--workers: .* 0 \(got -1\)$"):
        with_compute(Params(), workers=-1)
    with pytest.raises(
        ParamsError, match=r"^--scheduler: expected null, 'local' or .*\(got 'lo'\)$"
    ):
        with_compute(Params(), scheduler="lo")


def test_a_params_file_named_must_be_there_and_readable(tmp_path, monkeypatch):
    with pytest.raises(ParamsError, match=r"params.imagenet.yml: no such params file$"):
        load_params(tmp_path / "params.imagenet.yml")  # a typo must not run on defaults
    with pytest.raises(ParamsError, match=r": cannot read it \(IsADirectoryError\)$"):
        load_params(tmp_path)
    (tmp_path / "latin1.yaml").write_bytes("prepare:\n  raw: /données\n".encode("latin-1"))
    with pytest.raises(ParamsError, match=r": cannot read it \(UnicodeDecodeError\)$"):
        load_params(tmp_path / "latin1.yaml")
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the default file may be absent
    assert load_params() == Params()


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("prepare:\n  size: [256\n")
    with pytest.raises(ParamsError) as refused:
        load_params(path)
    # from the line of the `[` to where the file ended, and PyYAML's reason
    assert str(refused.value) == (
        f"{path}: lines 2-3 not valid YAML (expected ',' or ']', but got '<stream end>')"
    )
    path.write_text("train:\n\tlr: 0.01\n")  # a tab, which YAML's indentation refuses
    with pytest.raises(ParamsError) as refused:
        load_params(path)
    assert str(refused.value) == (
        f"{path}: line 2 not valid YAML (found character '\\t' that cannot start any token)"
    )


def test_a_key_written_twice_is_refused_naming_it_and_its_line(tmp_path):
    # PyYAML keeps the last of two equal keys: a second `train:` section appended to the
    # file replaced the whole first one, and train.epochs went back to its default.
    path = tmp_path / "params.yaml"
    lines = (REPO / "params.yaml").read_text().splitlines()
    path.write_text("\n".join([*lines, "train:", "  lr: 0.02", ""]))
    first = next(n for n, line in enumerate(lines, 1) if line.startswith("train:"))
    refused = rf"^{re.escape(str(path))}: duplicate key 'train' on line {len(lines) + 1} "
    with pytest.raises(ParamsError, match=refused + rf"\(first on line {first}\)$"):
        load_params(path)
    path.write_text("train:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n")  # within a section
    refused = r"params.yaml: duplicate key 'lr' on line 4 \(first on line 2\)$"
    with pytest.raises(ParamsError, match=refused):
        load_params(path)
    # A merge key's values may still be overridden beside it, as YAML says.
    path.write_text("x-base: &b {lr: 0.1}\ntrain:\n  <<: *b\n  lr: 0.2\n")
    with pytest.raises(ParamsError, match=r": unknown key 'x-base'$"):
        load_params(path)


def number_fields():
    """section.name of every int and float key (Literal ints included), as its default says."""
    numbers = {"train.max_epochs_per_rate"}  # int | None, None by default
    for section, values in Params().model_dump().items():
        for name, value in values.items():
            if type(value) in (int, float):  # not bool, a subclass of int
                numbers.add(f"{section}.{name}")
    return sorted(numbers)


def test_a_bool_is_not_a_number(tmp_path):
    # pydantic's lax mode reads `true` as 1: `epochs: true` trained one epoch.
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: true\n")
    refused = rf"^{re.escape(str(path))}: train.epochs: Input should not be true or false "
    with pytest.raises(ParamsError, match=refused + r"\(got True\)$"):
        load_params(path)
    keys = number_fields()
    assert {"train.lr", "train.epochs", "model.columns", "prepare.max_skipped"} <= set(keys)
    for key in keys:
        section, name = key.split(".")
        path.write_text(f"{section}:\n  {name}: false\n")
        with pytest.raises(ParamsError, match=rf": {key}: Input should not be .* \(got False\)$"):
            load_params(path)
    # A YAML int is still a float; a bool is still a bool.
    path.write_text("train:\n  lr: 1\n  amp: true\nmodel:\n  dropout: 0\n")
    params = load_params(path)
    assert (params.train.lr, params.train.amp, params.model.dropout) == (1.0, True, 0.0)
    assert type(params.train.lr) is float


def test_an_infinite_or_nan_float_is_refused(tmp_path):
    # `lr: .inf` passed `gt=0`; no knob means an infinite or NaN value. (A knob of a few
    # values, as `model.width`, names them.)
    path = tmp_path / "params.yaml"
    floats = [key for key in number_fields() if type(param_value(Params(), key)) is float]
    assert {"train.lr", "train.momentum", "model.dropout", "model.width"} <= set(floats)
    for key in floats:
        section, name = key.split(".")
        annotation = Params.model_fields[section].annotation.model_fields[name].annotation
        values = get_args(annotation) if get_origin(annotation) is Literal else ()
        listed = f"{', '.join(map(str, values[:-1]))} or {values[-1]} " if values else ""
        should = re.escape(listed) or "a finite number "
        for written, shown in ((".inf", "inf"), ("-.inf", "-inf"), (".nan", "nan")):
            path.write_text(f"{section}:\n  {name}: {written}\n")
            refused = rf"^{re.escape(str(path))}: {key}: Input should be {should}"
            with pytest.raises(ParamsError, match=refused + rf"\(got {shown}\)$"):
                load_params(path)


def test_train_device_is_always_a_list_of_names():
    assert parse_params({}).train.device == ("cpu",)
    assert parse_params({"train": {"device": "cuda"}}).train.device == ("cuda",)
    two = parse_params({"train": {"device": "cuda:0, cuda:1"}}).train.device
    assert two == ("cuda:0", "cuda:1")
    assert parse_params({"train": {"device": ["cuda:0", "cpu"]}}).train.device == ("cuda:0", "cpu")
    hash(parse_params({"train": {"device": ["cuda:0", "cpu"]}}))  # frozen sections stay hashable
    with pytest.raises(ParamsError, match="train.device"):
        parse_params({"train": {"device": 3}})


def test_a_device_name_torch_does_not_know_is_refused_when_loaded():
    """Not after the stages before train: `gpu` stops `dvc repro` at its first stage. A
    device this machine lacks is a name all the same (a deployment may run elsewhere)."""
    assert parse_params({"evaluate": {"device": "cuda:3"}}).evaluate.device == "cuda:3"
    bad = {"train.device": "gpu", "train.device.1": "cuda:0, gpu", "evaluate.device": "gpu"}
    for key, value in bad.items():
        section = key.split(".")[0]
        with pytest.raises(
            ParamsError, match=rf"^params: {re.escape(key)}: not a device name \(cpu, cuda"
        ):
            parse_params({section: {"device": value}})


def test_the_device_names_read_without_torch_are_ones_torch_takes():
    # `cpu`, `cuda`, `cuda:N` are read without importing torch (2-4 s a stage command):
    # each name read so is one torch takes, as that device; any other goes to torch.
    import torch

    plain = ["cpu", "cuda", "cuda:0", "cuda:7", "cuda:10", "cuda:99", "cpu:0", "cpu:3"]
    others = ["cuda:127", "cuda:128", "cuda:01", "cpu:00", "cuda:", "cuda:-1", "CUDA", " cuda"]
    assert [name for name in plain + others if PLAIN_DEVICE.fullmatch(name)] == plain
    for name in plain:
        device = torch.device(name)
        assert device.type in DEVICE_TYPES and str(device) == name, name


def test_params_naming_cuda_load_without_importing_torch(tmp_path):
    (tmp_path / "params.yaml").write_text(
        "train: {device: [cuda:0, cuda:1]}\nevaluate: {device: cuda}\n"
    )
    code = (
        "import sys; from alexnet.params import load_params; "
        f"p = load_params({str(tmp_path / 'params.yaml')!r}); "
        "print(p.train.device, p.evaluate.device, 'torch' in sys.modules)"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["('cuda:0',", "'cuda:1')", "cuda", "False"]


def test_a_device_torch_knows_but_the_pipeline_does_not_run_on_is_refused_when_loaded():
    # mps, meta, xpu passed as names, then crashed with a traceback where they were used
    for name in ("mps", "meta", "xpu"):
        with pytest.raises(ParamsError, match=r"not a device this pipeline runs on \(cpu, cuda"):
            parse_params({"evaluate": {"device": name}})


@pytest.mark.parametrize("devices", [[], ["cpu", "cpu", "cpu"]], ids=["none", "three"])
def test_train_device_takes_one_or_two_devices_when_loaded(devices):
    # refused when `dvc repro` starts, not when train starts after the stages before it
    with pytest.raises(ParamsError, match=r"^params: train.device"):
        parse_params({"train": {"device": devices}, "model": {"columns": 2}})


def test_kernels_switch_is_fast_or_reference():
    assert parse_params({}).compute.kernels == "fast"
    assert parse_params({"compute": {"kernels": "reference"}}).compute.kernels == "reference"
    with pytest.raises(ParamsError, match="compute.kernels"):
        parse_params({"compute": {"kernels": "numba"}})


def test_image_keys_are_prepare_fields():
    from alexnet.params import PrepareParams

    assert set(PrepareParams.IMAGE_KEYS) <= set(PrepareParams.model_fields)
    assert "IMAGE_KEYS" not in PrepareParams.model_fields  # a class constant, not a knob
    params = PrepareParams(size=128, resample="lanczos")
    assert params.image_options() == {
        "size": 128,
        "quality": 90,
        "resample": "lanczos",
        "max_pixels": 178_956_970,
        "exif_orientation": False,
        "icc_to_srgb": False,
        "frames": "first",
        "plugins": [],
    }
