"""`alexnet predict` is the evaluate stage on one file: the image prepared as the model
file says (prepare's image options, recorded at training), packed, and the 10-crop
softmax average; nothing but the model file is read."""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import pytest
import torch
from torchvision.io import decode_jpeg
from typer.testing import CliRunner

from alexnet.evaluate import crop_log_probabilities, evaluate, load_model_for
from alexnet.imageops import prepare_image
from alexnet.lmdb_store import write_store
from alexnet.modelfile import ModelFileError
from alexnet.pack import payload
from alexnet.params import PrepareParams
from alexnet.predict import PluginError, predict
from alexnet.prepare import max_file_bytes, too_large
from alexnet.reader import LmdbSplit
from alexnet.sources import display_name
from alexnet.train import Trainer
from flows.cli import app
from tests.decoder_plugin import CRASH, HANG
from tests.helpers import CLASSES, encode, jpeg, photo, train_run

# Not the defaults: predict must take them from the model file.
IMAGE = PrepareParams(quality=60, resample="bicubic").image_options()


@pytest.fixture(scope="module")
def model_file(data, tmp_path_factory) -> Path:
    """An untrained model file whose outputs move with the pixels: He-initialised, fc7
    and fc8 scaled down so the softmax is not saturated (a one-pixel shift of the image
    moves a probability by ~2e-4; caffe's initialisation by ~7e-6)."""
    run = train_run(data, tmp_path_factory.mktemp("predict"), {"init": "kaiming", "dropout": 0.0})
    run = run.model_copy(update={"image": IMAGE})
    t = Trainer(run)
    with torch.no_grad():
        for layer in [m for m in t.model.modules() if isinstance(m, torch.nn.Linear)][-2:]:
            layer.weight *= 0.1
            layer.bias *= 0.1
    t.export(run.model_path)
    return run.model_path


def probabilities_of(model, jpeg_bytes: bytes, mean: torch.Tensor) -> torch.Tensor:
    image = decode_jpeg(torch.frombuffer(bytearray(jpeg_bytes), dtype=torch.uint8))
    return crop_log_probabilities(model, image[None], mean, model.input_size).exp().mean(1)[0]


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_predict_equals_evaluate_on_the_same_image(
    data, model_file, tmp_path, encoding, monkeypatch
):
    path = tmp_path / "photo.jpg"
    path.write_bytes(jpeg(411, 300, seed=3))
    # The pipeline: prepare (the options the model was trained with), pack, evaluate.
    prepared = prepare_image(path.read_bytes(), path.suffix, **IMAGE)
    write_store(
        tmp_path / "val",
        [[(1, payload(prepared.jpeg, encoding, IMAGE["size"]))]],
        encoding,
        CLASSES,
        size=IMAGE["size"],
    )
    split = LmdbSplit(tmp_path / "val")
    device = torch.device("cpu")
    model, contents = load_model_for(split, model_file, device)
    mean = contents["mean"].float()  # as the evaluate flow reads it
    seen = []

    def spy(*args):
        seen.append(crop_log_probabilities(*args))
        return seen[-1]

    monkeypatch.setattr("alexnet.evaluate.crop_log_probabilities", spy)
    results = evaluate(model, split, mean, model.input_size, 4, device)
    [crops] = seen
    evaluated = crops.exp().mean(1)[0]

    [prediction] = predict([path], model_file, top=2, device="cpu")
    assert prediction.error is None and prediction.top[0]["index"] == int(results.predicted[0])
    predicted = {entry["index"]: entry["probability"] for entry in prediction.top}
    assert sorted(predicted) == [0, 1]
    for index, probability in predicted.items():
        assert probability == pytest.approx(float(evaluated[index]), abs=1e-6), index
    # The tolerance means something: the image prepared with params' default options
    # instead of the model file's gives other probabilities.
    default = prepare_image(path.read_bytes(), path.suffix, **PrepareParams().image_options())
    assert (probabilities_of(model, default.jpeg, mean) - evaluated).abs().max() > 1e-5


def test_predict_refuses_a_model_file_of_another_version(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"format": "alexnet-model", "version": 1, "history": []}, path)
    with pytest.raises(ModelFileError, match="model file version 1, this code reads 2; train"):
        predict([tmp_path / "any.jpg"], path, 5, "cpu")


# Allowed with --plugin: a format whose files crash or hang their decoder, as a hostile or
# damaged file can in C code (the decoder's process is killed, not predict's)
MISBEHAVING = "tests.decoder_plugin"
TIMEOUT = 2  # s a file may keep the decoder (--file-timeout)


def bad_and_good_files(
    folder: Path, hang: bool = False
) -> tuple[list[Path], dict[str, str | None]]:
    """Image paths, good and bad, and the error each must get (None: predicted; "" for a
    reason the decoder gives, whatever its words); with a file that hangs the decoder
    (`TIMEOUT` twice) where `hang`."""
    files = {
        "good.jpg": jpeg(300, 260, seed=1),
        "text.jpg": b"this is not an image\n",
        "cut.jpg": jpeg(300, 260, seed=2)[:700],
        "empty.jpg": b"",
        "crash.jpg": CRASH + b"...",
        "good.png": encode(photo(200, 240, seed=3), "PNG"),
    }
    if hang:
        files["hang.jpg"] = HANG + b"..."
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "folder.jpg").mkdir()
    (folder / "dangling.jpg").symlink_to(folder / "gone.jpg")
    # read whole, a video or a disk image could exhaust the memory (sparse: no disk used)
    limit = max_file_bytes(PrepareParams().max_pixels)
    (folder / "huge.jpg").touch()
    os.truncate(folder / "huge.jpg", limit + 1)
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.jpg"), "wb") as stream:
        stream.write(jpeg(300, 260, seed=4))  # a name that is not UTF-8: shown escaped
    expected = {
        "good.jpg": None,
        "text.jpg": "",
        "cut.jpg": "",
        "empty.jpg": "",
        "crash.jpg": "decoder crashed (SIGSEGV)",
        **({"hang.jpg": f"timed out after {TIMEOUT} s"} if hang else {}),
        "folder.jpg": "is a directory",
        "missing.jpg": "no such file",
        "dangling.jpg": "broken symbolic link",
        "good.png": None,
        "huge.jpg": too_large(limit + 1, limit),
        "caf\udce9.jpg": None,
    }
    return [folder / name for name in expected], expected


def test_each_bad_file_gets_one_error_line_and_the_others_are_predicted(model_file, tmp_path):
    # a file that crashed or hung the decoder took the command, and every result before it
    paths, expected = bad_and_good_files(tmp_path, hang=True)
    command = ["predict", *map(str, paths), "--model", str(model_file), "--top", "2", "--json"]
    command += ["--plugin", MISBEHAVING, "--file-timeout", str(TIMEOUT)]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 1
    rows = json.loads(result.stdout)
    assert [row["path"] for row in rows] == [display_name(p) for p in paths]
    lines = iter(result.stderr.splitlines())
    for path, row, (name, error) in zip(paths, rows, expected.items(), strict=True):
        if error is None:
            assert "error" not in row and len(row["predictions"]) == 2, name
            continue
        assert row["error"] and "\n" not in row["error"], name
        assert error == "" or row["error"] == error, (name, row["error"])
        assert next(lines) == f"error: {display_name(path)}: {row['error']}"  # the path once
    assert next(lines, None) is None


def test_a_refused_read_or_a_decoders_own_exception_is_the_files_one_line(tmp_path, monkeypatch):
    # What the decoder's process answers for each file (here in this process, to make
    # a refusal up: as root, a chmod 000 file stays readable).
    import alexnet.user_images

    (tmp_path / "locked.jpg").write_bytes(jpeg(64, 64))
    (tmp_path / "odd.jpg").write_bytes(odd := jpeg(64, 64, seed=5))
    read_bytes, prepare = Path.read_bytes, alexnet.user_images.prepare_image

    def refusing(path: Path) -> bytes:
        if path.name == "locked.jpg":
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    def decoder_bug(data: bytes, suffix: str, **options):  # Pillow raises SyntaxError too
        if data == odd:
            raise SyntaxError("broken chunk\nat 12")
        return prepare(data, suffix, **options)

    monkeypatch.setattr(Path, "read_bytes", refusing)
    monkeypatch.setattr(alexnet.user_images, "prepare_image", decoder_bug)
    request = {
        "paths": [str(tmp_path / name) for name in ("locked.jpg", "odd.jpg", "skipped.jpg")],
        "options": IMAGE,
        "plugins": [],
    }
    answers = alexnet.user_images.in_child(request, {2: "timed out after 2 s"}, lambda i: None)
    assert answers == [
        {"error": "permission denied"},
        {"error": "SyntaxError: broken chunk at 12"},
        {"error": "timed out after 2 s"},
    ]


def test_predictions_in_batches_are_each_files_own_and_come_batch_by_batch(
    model_file, tmp_path, monkeypatch
):
    # A forward pass takes up to `batch` images (one at a time made passes of one crop);
    # a bad file among them keeps its place, and each batch's results come before the
    # next batch is read (the command prints them as they come).
    import alexnet.predict

    paths, expected = bad_and_good_files(tmp_path)
    alone = list(predict(paths, model_file, 3, "cpu", [MISBEHAVING], batch=1))
    loads, load = [], alexnet.predict.prepare_files
    monkeypatch.setattr(
        alexnet.predict, "prepare_files", lambda c, p, **o: loads.append(len(p)) or load(c, p, **o)
    )
    together = predict(paths, model_file, 3, "cpu", [MISBEHAVING], batch=4)
    first = [next(together) for _ in range(4)]
    assert loads == [4]  # the first batch only, read
    together = first + list(together)
    assert [r.path for r in together] == [r.path for r in alone]
    assert [r.error for r in together] == [r.error for r in alone]
    assert sum(r.error is None for r in together) == 3  # of 3 batches, good files in 2
    for one, other in zip(alone, together, strict=True):
        assert [c["index"] for c in one.top] == [c["index"] for c in other.top], one.path
        for a, b in zip(one.top, other.top, strict=True):
            assert a["probability"] == pytest.approx(b["probability"], abs=1e-6), one.path


class RunsCode:
    """Unpickling this runs a shell command: what a hostile model file carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


FOREIGN = {  # a model file that is not ours: how it is made, and the line refusing it
    "random bytes": (
        lambda p, marker: p.write_bytes(random.Random(0).randbytes(4096)),
        "not an alexnet model file (not a torch zip/pickle)",
    ),
    "zero-length": (
        lambda p, marker: p.write_bytes(b""),
        "not an alexnet model file (an empty file)",
    ),
    "text": (
        lambda p, marker: p.write_text("weights: none\nhello\n"),
        "not an alexnet model file (not a torch zip/pickle)",
    ),
    "torch file with code": (
        lambda p, marker: torch.save({"state_dict": RunsCode(marker)}, p),
        "refused: not an alexnet model file (it holds pickled code: posix.system; only "
        "weights are loaded)",
    ),
    "legacy torch file with code": (
        lambda p, marker: torch.save(RunsCode(marker), p, _use_new_zipfile_serialization=False),
        "refused: not an alexnet model file (it holds pickled code: posix.system; only "
        "weights are loaded)",
    ),
    "torch file with a class": (
        lambda p, marker: torch.save({"model": torch.nn.Linear}, p),
        "refused: not an alexnet model file (it holds pickled code: "
        "torch.nn.modules.linear.Linear; only weights are loaded)",
    ),
    "plain pickle with code": (
        lambda p, marker: p.write_bytes(pickle.dumps(RunsCode(marker), protocol=2)),
        "refused: not an alexnet model file (it holds pickled code: posix.system; only "
        "weights are loaded)",
    ),
    "plain pickle, protocol 5": (
        lambda p, marker: p.write_bytes(pickle.dumps(RunsCode(marker), protocol=5)),
        "refused: not an alexnet model file (it holds pickled objects other than weights; "
        "only weights are loaded)",
    ),
    "torch file cut short": (
        lambda p, marker: (torch.save({"w": torch.zeros(99)}, p), cut_to(p, 300)),
        "not an alexnet model file (a damaged torch file, or a zip archive that is not one)",
    ),
    "another torch file": (
        lambda p, marker: torch.save({"w": torch.zeros(3)}, p),
        "not an alexnet model file (no format 'alexnet-model')",
    ),
    "a training checkpoint": (  # (--model models/checkpoints/train.pt)
        lambda p, marker: torch.save({"digest": "0" * 64, "optimizer": {"state": {}}}, p),
        "a training checkpoint, not a model file: name the model file train writes when it "
        "ends (its MODEL)",
    ),
    "a folder": (lambda p, marker: p.mkdir(), "is a directory, not a model file"),
    "missing": (lambda p, marker: None, "no such model file; run train"),
}


def cut_to(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


@pytest.mark.parametrize("case", list(FOREIGN))
def test_a_file_that_is_not_a_model_is_refused_before_any_work_as_loading_would(
    model_file, tmp_path, case
):
    # evaluate refuses it before Prefect's server starts (the file mapped, not read), with
    # the line load_model gives
    from alexnet.modelfile import check_model_file, load_model

    make, _ = FOREIGN[case]
    path, marker = tmp_path / "model.pt", tmp_path / "code-ran"
    make(path, marker)
    with pytest.raises(ModelFileError) as early:
        check_model_file(path)
    with pytest.raises(ModelFileError) as late:
        load_model(path)
    assert str(early.value) == str(late.value)
    assert not marker.exists()
    check_model_file(model_file)


@pytest.mark.parametrize("case", list(FOREIGN))
def test_a_model_file_that_is_not_ours_is_refused_in_one_line(tmp_path, case):
    make, reason = FOREIGN[case]
    path, marker = tmp_path / "model.pt", tmp_path / "code-ran"
    make(path, marker)
    with pytest.raises(ModelFileError) as caught:
        predict([tmp_path / "any.jpg"], path, 5, "cpu")
    line = str(caught.value)
    assert line == f"{path}: {reason}"
    assert "weights_only" not in line and "\n" not in line
    assert not marker.exists()  # never unpickled with code allowed


def test_the_refusal_is_the_commands_one_error_line(tmp_path):
    path, marker = tmp_path / "model.pt", tmp_path / "code-ran"
    torch.save({"state_dict": RunsCode(marker)}, path)
    (tmp_path / "a.jpg").write_bytes(jpeg(64, 64))
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "a.jpg"), "--model", str(path)])
    assert result.exit_code == 1 and not marker.exists()
    assert result.output.strip() == (
        f"error: {path}: refused: not an alexnet model file (it holds pickled code: "
        "posix.system; only weights are loaded)"
    )


def recorded(model_file: Path, folder: Path, **changes) -> Path:
    """A copy of the model file with some of its contents replaced."""
    contents = torch.load(model_file, weights_only=True)
    path = folder / "changed.pt"
    torch.save({**contents, **changes}, path)
    return path


def test_the_plugins_a_model_file_names_are_imported_only_when_allowed(
    model_file, tmp_path, monkeypatch
):
    # Importing a module runs its code: a model file from someone else must not make
    # predict import what it names (here a module that leaves a mark when imported).
    marker = tmp_path / "imported"
    name = f"plugin_{os.getpid()}_{random.randrange(10**9)}"
    (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    prepare = torch.load(model_file, weights_only=True)["prepare"]
    path = recorded(model_file, tmp_path, prepare={**prepare, "plugins": [name]})
    image = tmp_path / "a.jpg"
    image.write_bytes(jpeg(300, 260, seed=1))
    with pytest.raises(PluginError, match=rf"importing them runs their code: .*--plugin {name}$"):
        predict([image], path, 5, "cpu")
    assert not marker.exists()
    [result] = predict([image], path, 5, "cpu", plugins=[name])
    assert marker.exists() and result.error is None and len(result.top) == 2
    # a plugin the user allows that the model file does not name (a HEIC reader) too
    other, mark = f"{name}_other", tmp_path / "other imported"
    (tmp_path / f"{other}.py").write_text(f"open({str(mark)!r}, 'w').close()\n")
    predict([image], model_file, 5, "cpu", plugins=[other])
    assert mark.exists()
    missing = recorded(model_file, tmp_path, prepare={**prepare, "plugins": ["no_such_plugin"]})
    with pytest.raises(PluginError) as refused:  # once, not per image
        predict([image], missing, 5, "cpu", plugins=["no_such_plugin"])
    assert str(refused.value) == (
        f"{missing}: its PIL plugin no_such_plugin cannot be imported (No module named "
        "'no_such_plugin')"
    )
    # one the user names, not the model file: the line says so
    with pytest.raises(PluginError) as refused:
        predict([image], model_file, 5, "cpu", plugins=["no_such_plugin"])
    assert str(refused.value) == (
        "--plugin no_such_plugin cannot be imported (No module named 'no_such_plugin')"
    )


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"mean": [1.0, 2.0]}, "mean is not a (3, H, W) image"),
        ({"classes": CLASSES[:1]}, "1 classes for 2 outputs"),
        ({"classes": "two"}, "classes is not a list of classes"),
    ],
)
def test_a_model_file_whose_contents_do_not_fit_is_refused(model_file, tmp_path, changes, reason):
    path = recorded(model_file, tmp_path, **changes)
    with pytest.raises(ModelFileError) as caught:
        predict([tmp_path / "any.jpg"], path, 5, "cpu")
    assert str(caught.value) == f"{path}: damaged model file: {reason}"


def test_a_wrong_device_is_one_error_line(model_file, tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg(64, 64))
    args = ["predict", str(tmp_path / "a.jpg"), "--model", str(model_file), "--device", "gpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and result.output.startswith("error: device 'gpu': not a device")
    assert result.output.count("\n") == 1
