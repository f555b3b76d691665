"""`alexnet predict` is the evaluate stage on one file: the image prepared as the model
file says (prepare's image options, recorded at training), packed, and the 10-crop
softmax average; nothing but the model file is read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.io import decode_jpeg

from alexnet.evaluate import crop_probabilities, evaluate, load_model_for
from alexnet.imageops import prepare_image
from alexnet.lmdb_store import write_store
from alexnet.modelfile import ModelFileError
from alexnet.pack import payload
from alexnet.params import PrepareParams
from alexnet.predict import predict
from alexnet.reader import LmdbSplit
from alexnet.train import Trainer
from tests.helpers import CLASSES, jpeg, train_run

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
    return crop_probabilities(model, image[None], mean, model.input_size).mean(1)[0]


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
    )
    split = LmdbSplit(tmp_path / "val")
    device = torch.device("cpu")
    model, contents = load_model_for(split, model_file, device)
    mean = contents["mean"].float()  # as the evaluate flow reads it
    seen = []

    def spy(*args):
        seen.append(crop_probabilities(*args))
        return seen[-1]

    monkeypatch.setattr("alexnet.evaluate.crop_probabilities", spy)
    results = evaluate(model, split, mean, model.input_size, 4, device)
    [crops] = seen
    evaluated = crops.mean(1)[0]

    [prediction] = predict([path], model_file, top=2)
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
        predict([tmp_path / "any.jpg"], path)
