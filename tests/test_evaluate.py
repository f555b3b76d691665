"""Evaluation (section 4.1) and prediction: crop windows, softmax averaging, top-k
math, a trained model file, the metric files, and predict on odd files."""

from __future__ import annotations

import base64
import csv
import io
import json
import multiprocessing
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.crops import CENTRE
from alexnet.evaluate import (
    Results,
    crop_average,
    crop_log_probabilities,
    evaluate,
    top5_table,
)
from alexnet.metrics import label_ranks, predicted
from alexnet.modelfile import ModelFileError, load_model
from alexnet.reader import LmdbSplit
from alexnet.train import Trainer
from tests.helpers import (
    CLASSES,
    EPOCH_ENDS,
    REPO,
    assert_writes_what_dvc_tracks,
    blobs,
    train_run,
)

CPU = torch.device("cpu")


class CropTable(torch.nn.Module):
    """Logits by crop index: the r-th crop it sees (over all calls) gets table[r % 10]."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table, self.seen = table, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(self.seen, self.seen + x.shape[0]) % 10
        self.seen += x.shape[0]
        return self.table[rows]


def test_the_prediction_averages_softmax_outputs_not_logits(tmp_path):
    # Crop 0 is sure of class 0; nine crops mildly prefer class 1. Mean logits pick
    # class 0 (1.0 vs 0.45); mean probabilities pick class 1 (0.44 vs 0.56).
    from alexnet.lmdb_store import write_store

    table = torch.tensor([[10.0, 0.0]] + [[0.0, 0.5]] * 9)
    assert table.mean(0).argmax().item() == 0  # what averaging the logits would say
    logs = crop_log_probabilities(CropTable(table), torch.zeros(1, 3, 256, 256), None, 224)
    assert torch.allclose(logs[0].exp(), torch.softmax(table, 1))
    assert crop_average(logs).argmax(1).tolist() == [1]  # predict's average too
    # through evaluate: images of class 1, every one right under the paper's average
    write_store(tmp_path / "val", [blobs(1, 3, 0)], "raw", CLASSES, size=256)
    split = LmdbSplit(tmp_path / "val")
    results = evaluate(CropTable(table), split, None, 224, 2, torch.device("cpu"), keep=[0, 2])
    assert results.summary()["top1_error"] == 0.0
    assert torch.allclose(results.kept.exp(), torch.softmax(table, 1).mean(0).expand(2, 2))


def test_the_centre_crop_errors_are_the_centre_patchs(tmp_path):
    # Only the centre patch (crop 4 of ten_crops' order) is right about each image, the
    # nine others strongly wrong: 10-crop top-1 error 1, centre-crop top-1 error 0.
    from alexnet.lmdb_store import write_store

    write_store(tmp_path / "val", [blobs(1, 6, 0)], "raw", CLASSES, size=256)
    table = torch.tensor([[9.0, 0.0]] * 4 + [[0.0, 9.0]] + [[9.0, 0.0]] * 5)
    split = LmdbSplit(tmp_path / "val")
    summary = evaluate(CropTable(table), split, None, 224, 4, torch.device("cpu")).summary()
    assert (summary["top1_error"], summary["center_top1_error"]) == (1.0, 0.0)


def named(count: int) -> list[dict]:
    return [{"index": i, "wnid": f"n{i}", "name": f"c{i}"} for i in range(count)]


@pytest.mark.parametrize(
    ("centre_right", "errors"), [(False, (0.0, 0.0, 1.0, 1.0)), (True, (1.0, 1.0, 0.0, 0.0))]
)
def test_the_top5_errors_are_the_ranks_of_their_own_prediction(tmp_path, centre_right, errors):
    # 7 classes, the label 6: where the nine other crops are sure of it and the centre
    # ranks it last, only the centre crop's top 5 misses; the other way round, only the
    # 10-crop average's (the one test of top 5 with more than 5 classes).
    from alexnet.lmdb_store import write_store

    write_store(tmp_path / "val", [blobs(6, 3, 0)], "raw", named(7), size=256)
    sure, last = [0.0] * 6 + [20.0], [5.0] * 6 + [0.0]
    table = torch.tensor([last if centre_right else sure] * 10)
    table[CENTRE] = torch.tensor(sure if centre_right else last)
    results = evaluate(CropTable(table), LmdbSplit(tmp_path / "val"), None, 224, 2, CPU)
    summary = results.summary()
    keys = ("top1_error", "top5_error", "center_top1_error", "center_top5_error")
    assert tuple(summary[k] for k in keys) == errors
    per_class = results.per_class(named(7))[6]
    assert (per_class["top1_error"], per_class["top5_error"]) == errors[:2]


def test_a_label_far_below_the_top_class_keeps_its_rank(tmp_path):
    # The label (class 1) is second, 140 below the first: its float32 probability is 0,
    # as are those of the eight classes below it. Ranked by probability it would tie
    # with them and come last (ties count against it); in logs it is second.
    from alexnet.lmdb_store import write_store

    logits = torch.tensor([200.0, 60.0, 55.0, 50.0, 45.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert torch.softmax(logits, 0)[1] == 0  # the underflow
    write_store(tmp_path / "val", [blobs(1, 2, 0)], "raw", named(10), size=256)
    split = LmdbSplit(tmp_path / "val")
    results = evaluate(CropTable(logits.expand(10, 10)), split, None, 224, 2, CPU, keep=[0])
    assert results.rank.tolist() == [1, 1] == results.centre_rank.tolist()
    assert results.summary()["top5_error"] == 0.0 == results.summary()["center_top5_error"]
    rows = top5_table([0], [1], results.kept, [c["name"] for c in named(10)])
    assert [row["class"] for row in rows] == ["c0", "c1", "c2", "c3", "c4"]
    assert rows[0]["probability"] == 1.0 and rows[1]["probability"] == 0.0


def test_the_confusion_plot_counts_a_tie_as_the_error_rates_do(tmp_path):
    # A model that scores every class alike knows nothing: every image a top-1 mistake,
    # and the confusion plot's predicted class is never the label (argmax would say 0).
    from alexnet.lmdb_store import write_store

    write_store(tmp_path / "val", [blobs(0, 2, 0), blobs(1, 1, 1)], "raw", named(3), size=256)
    results = evaluate(
        CropTable(torch.zeros(10, 3)), LmdbSplit(tmp_path / "val"), None, 224, 2, CPU
    )
    assert results.summary()["top1_error"] == 1.0
    assert all(row["actual"] != row["predicted"] for row in results.confusion(named(3)))
    # a right answer stays right, a wrong one names the class that beat the label
    scores = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, 3.0], [0.0, 1.0, 1.0]])
    labels = torch.tensor([0, 2, 1])
    assert predicted(scores, labels, label_ranks(scores, labels)).tolist() == [0, 1, 2]


def test_the_plots_show_the_classes_of_highest_error_and_the_rest_as_other():
    # ImageNet's 1,000 classes would make 1,000 bars and a 1,000 x 1,000 matrix
    from alexnet.eval_files import WORST_CLASSES, WORST_CONFUSION
    from alexnet.evaluate import OTHER, Results

    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    guesses = torch.tensor([0, 0, 2, 3, 1, 2, 3, 3])  # c1 all wrong, c2 half, others right
    rank = (guesses != labels).long()  # the label's rank: 0 = first
    results = Results(labels, guesses, rank, rank)
    classes = named(5)  # c4 has no image: no error rate to rank, never shown
    per_class = results.per_class(classes)
    plotted = results.plotted(classes, per_class, 2)
    assert [row["name"] for row in plotted["worst_classes"]] == ["c1", "c2"]
    assert plotted["worst_confusion"] == [
        {"actual": "c1", "predicted": "c2"},
        {"actual": "c1", "predicted": OTHER},  # c3, not shown
        {"actual": "c2", "predicted": "c1"},
        {"actual": "c2", "predicted": "c2"},
    ]
    # as many as there are classes: every image, as confusion.csv
    everything = results.plotted(classes, per_class, 5)
    assert everything["worst_confusion"] == results.confusion(classes)
    assert [row["class"] for row in everything["worst_classes"]] == [1, 2, 0, 3]
    # two classes of one name (ImageNet's "crane"s) are two bars, labelled as the matrix
    cranes = [
        {**entry, "name": "crane"} if entry["index"] in (1, 2) else entry for entry in classes
    ]
    plotted = results.plotted(cranes, results.per_class(cranes), 2)
    labels = [row["label"] for row in plotted[WORST_CLASSES]]
    assert labels == [f"crane ({entry['wnid']})" for entry in cranes[1:3]]
    assert set(labels) == {row["actual"] for row in plotted[WORST_CONFUSION]}


@pytest.fixture(scope="module")
def model_file(data, tmp_path_factory):
    run = train_run(
        data,
        tmp_path_factory.mktemp("model"),
        {"dropout": 0.0, "width": 1.0},  # the paper's net: it learns the task, 96 kernels
        batch_size=5,
        epochs=4,
        lr=0.02,
        lighting=0.0,
        **EPOCH_ENDS,
    )
    t = Trainer(run)
    t.save = lambda: None  # only the model file is used (a checkpoint costs ~1-3 s)
    while not t.finished():
        t.run_epoch()
    t.export(run.model_path)
    return run.model_path


def test_a_trained_model_file_classifies_its_training_images(data, model_file):
    model, payload = load_model(model_file)
    results = evaluate(
        model, LmdbSplit(data / "lmdb" / "train"), payload["mean"], 224, 4, torch.device("cpu")
    )
    summary = results.summary()
    assert summary["images"] == 10 and summary["top1_error"] <= 0.2, summary
    assert [row["images"] for row in results.per_class(CLASSES)] == [5, 5]
    assert len(results.confusion(CLASSES)) == 10
    # two classes of one name (ImageNet's "crane", a bird and a machine) stay two
    cranes = [{**entry, "name": "crane"} for entry in CLASSES]
    rows = results.confusion(cranes)
    assert {row["actual"] for row in rows} == {f"crane ({entry['wnid']})" for entry in CLASSES}
    assert [row["predicted"] != row["actual"] for row in rows] == (
        results.predicted != results.labels
    ).tolist()


def test_a_checkpoint_named_as_the_model_is_refused_before_any_work(data, tmp_path):
    # (It was refused once loaded in the flow: after Prefect's server had started.)
    from alexnet.evaluate import refuse
    from alexnet.modelfile import ModelFileError

    checkpoint = tmp_path / "train.pt"
    torch.save({"digest": "0" * 64, "optimizer": {"state": {}}}, checkpoint)
    lmdb = data / "lmdb"
    with pytest.raises(ModelFileError, match="train.pt: a training checkpoint, not a model"):
        refuse(str(lmdb / "val"), str(checkpoint), str(lmdb / "train"), str(tmp_path / "m"))


def test_read_ahead_gives_the_same_numbers(data, model_file):
    # Why evaluate.loader_workers is an execution key (no DVC param of the stage): loader
    # processes read the batches in order, and the model sees the same batches.
    model, payload = load_model(model_file)
    split = LmdbSplit(data / "lmdb" / "val")
    readers: list[int] = []  # the loader processes alive at each forward pass
    before = set(multiprocessing.active_children())
    model.register_forward_hook(
        lambda *_: readers.append(len(set(multiprocessing.active_children()) - before))
    )

    def run(workers: int) -> Results:
        every = range(len(split))
        readers.clear()
        result = evaluate(
            model, split, payload["mean"], 224, 3, torch.device("cpu"), None, every, workers
        )
        assert readers and set(readers) == {workers}  # the batches came from them
        return result

    alone, ahead = run(0), run(2)
    for name in ("labels", "predicted", "rank", "centre_rank", "kept"):
        assert torch.equal(getattr(alone, name), getattr(ahead, name)), name


def test_the_speed_switches_give_the_float32_softmax_up_to_bf16_rounding(data, model_file):
    # params evaluate.amp and evaluate.channels_last: the same model, faster on a GPU.
    # Both must act (bf16 layers up to fc7, channels-last weights), and change only the
    # rounding; fc8 stays float32 (bf16 logits tie classes: a tie counts as an error).
    from alexnet.evaluate import speed_switches

    model, payload = load_model(model_file)
    images, _ = LmdbSplit(data / "lmdb" / "val").read_batch(range(4))
    exact = crop_log_probabilities(model, images, payload["mean"], 224).exp()
    seen: dict[str, set[torch.dtype]] = {"fc7": set(), "fc8": set()}
    for name, dtypes in seen.items():
        hook = lambda m, i, out, dtypes=dtypes: dtypes.add(out.dtype)  # noqa: E731
        model.layers()[name].register_forward_hook(hook)
    with speed_switches(model, torch.device("cpu"), amp=True, channels_last=True):
        fast = crop_log_probabilities(model, images, payload["mean"], 224).exp()
    conv1 = model.layers()["conv1"].weight
    assert seen == {"fc7": {torch.bfloat16}, "fc8": {torch.float32}}
    assert conv1.is_contiguous(memory_format=torch.channels_last)
    assert fast.dtype == torch.float32 and not torch.equal(fast, exact)
    torch.testing.assert_close(fast, exact, atol=0.02, rtol=0)  # probabilities, bf16 logits


def test_evaluate_flow_writes_the_metric_files(data, model_file, tmp_path, prefect_server):
    from alexnet.params import ComputeParams, EvaluateParams
    from flows.evaluate import evaluate_flow

    metrics = tmp_path / "metrics"
    folder = metrics / "eval"
    state = evaluate_flow(
        str(data / "lmdb" / "val"),
        str(model_file),
        str(data / "lmdb" / "train"),
        str(metrics),
        EvaluateParams(batch_size=3, gallery=3, queries=2, neighbours=4, neighbour_batch=3),
        ComputeParams(),
        return_state=True,
    )
    summary = state.result()
    assert_writes_what_dvc_tracks("evaluate", tmp_path, ("metrics",))
    written = json.loads((metrics / "eval.json").read_text())
    assert written == summary
    assert list(written) == [
        "top1_error",
        "top5_error",
        "center_top1_error",
        "center_top5_error",
        "images",
    ]
    assert written["images"] == 4 and all(0 <= written[k] <= 1 for k in list(written)[:4])
    # the flow's numbers are the library's evaluation of the model file's network, with
    # the mean image it trained with, on the val store (its wiring: mean, crop, store)
    model, payload = load_model(model_file)
    val = LmdbSplit(data / "lmdb" / "val")
    direct = evaluate(model, val, payload["mean"].float(), 224, 3, torch.device("cpu"))
    assert written == direct.summary()
    rows = list(csv.DictReader(io.StringIO((folder / "per_class.csv").read_text())))
    assert list(rows[0]) == ["class", "wnid", "name", "images", "top1_error", "top5_error"]
    assert [r["name"] for r in rows] == ["c0", "c1"]
    confusion = list(csv.DictReader(io.StringIO((folder / "confusion.csv").read_text())))
    assert len(confusion) == 4 and set(confusion[0]) == {"actual", "predicted"}
    # the plots' data: 2 classes, fewer than evaluate.plot_classes, so every image
    plotted = (folder / "worst_confusion.csv").read_bytes()
    assert plotted == (folder / "confusion.csv").read_bytes()
    worst = list(csv.DictReader(io.StringIO((folder / "worst_classes.csv").read_text())))
    assert [row.pop("label") for row in worst] == [row["name"] for row in worst]
    assert sorted(worst, key=lambda row: row["class"]) == rows
    # Section 6.1's figures, and the data they show.
    for name, least in {
        "kernels": (700, 300),
        "top5": (600, 150),
        "neighbours": (500, 250),
    }.items():
        image = Image.open(folder / f"{name}.png")
        assert image.format == "PNG" and min(np.subtract(image.size, least)) >= 0, image.size
    val = LmdbSplit(data / "lmdb" / "val")
    gallery = read_csv(folder / "top5.csv")
    assert len(gallery) == 3 * 2  # 3 images, 2 classes each (fewer than 5)
    for row in gallery:  # the true class is the store's label of that key
        assert row["true_class"] == f"c{val[int(row['key'])][1]}"
    neighbours = read_csv(folder / "neighbours.csv")
    assert [int(r["rank"]) for r in neighbours] == [1, 2, 3, 4] * 2
    assert len({r["neighbour_key"] for r in neighbours[:4]}) == 4
    distances = [float(r["distance"]) for r in neighbours[:4]]
    assert distances == sorted(distances)
    # The Prefect UI shows each figure as an image artifact of the run (a data URL).
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    # this run's (the session's server records the other tests' runs too)
    run = ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
    with get_client(sync_client=True) as client:
        for name in ("kernels", "top5", "neighbours"):
            key = ArtifactFilterKey(any_=[f"evaluation-{name}"])
            [artifact] = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=key, flow_run_id=run)
            )
            url = artifact.data
            assert url.startswith("data:image/png;base64,") and artifact.type == "image"
            figure = (folder / f"{name}.png").read_bytes()
            assert base64.b64decode(url.split(",", 1)[1]) == figure


def read_csv(path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_evaluate_refuses_a_model_of_other_classes(data, model_file, tmp_path, prefect_server):
    from alexnet.lmdb_store import write_store
    from alexnet.params import ComputeParams, EvaluateParams
    from flows.evaluate import evaluate_flow

    three = [{"index": i, "wnid": f"n{i}", "name": f"c{i}"} for i in range(3)]
    write_store(tmp_path / "val3", [blobs(0, 2, 9)], "raw", three, size=256)
    with pytest.raises(ModelFileError, match="has 2 classes, .* has 3"):
        evaluate_flow(
            str(tmp_path / "val3"),
            str(model_file),
            str(data / "lmdb" / "train"),
            str(tmp_path),
            EvaluateParams(),
            ComputeParams(),
        )


def test_evaluate_refuses_a_train_store_of_other_classes(
    data, model_file, tmp_path, prefect_server
):
    from alexnet.lmdb_store import StoreError, write_store
    from alexnet.params import ComputeParams, EvaluateParams
    from flows.evaluate import evaluate_flow

    others = [{"index": i, "wnid": f"n{i}", "name": f"other{i}"} for i in range(2)]
    write_store(tmp_path / "train", [blobs(0, 2, 9)], "raw", others, size=256)
    # nor an empty one: refused before the evaluation, not at its end
    write_store(tmp_path / "empty", [], "raw", CLASSES, size=256)
    for train, refusal in (("train", "list different classes"), ("empty", "no images to search")):
        with pytest.raises(StoreError, match=refusal):
            evaluate_flow(
                str(data / "lmdb" / "val"),
                str(model_file),
                str(tmp_path / train),
                str(tmp_path),
                EvaluateParams(),
                ComputeParams(),
            )
    assert not (tmp_path / "eval.json").exists()


def image_of(label: int) -> Image.Image:
    return Image.fromarray(
        np.frombuffer(blobs(label, 1, 7 + label)[0][1], np.uint8).reshape(256, 256, 3)
    )


def test_predict_cmyk_png_in_jpeg_and_a_bad_file(model_file, tmp_path):
    image_of(0).convert("CMYK").save(tmp_path / "cmyk.jpg", "JPEG", quality=95)
    image_of(1).resize((300, 400)).save(tmp_path / "png.JPEG", "PNG")  # PNG named .JPEG
    (tmp_path / "broken.jpg").write_bytes(b"<html>not an image</html>")
    files = [str(tmp_path / name) for name in ("cmyk.jpg", "broken.jpg", "png.JPEG")]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "predict",
            *files,
            "--model",
            str(model_file),
            "--top",
            "2",
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: {files[1]}: not an image"
    results = json.loads(done.stdout)
    assert [r["path"] for r in results] == files and results[1] == {
        "path": files[1],
        "error": "not an image",
    }
    assert results[0]["predictions"][0]["name"] == "c0"
    assert results[2]["predictions"][0]["name"] == "c1"
    assert len(results[0]["predictions"]) == 2
    assert sum(p["probability"] for p in results[0]["predictions"]) == pytest.approx(1, abs=1e-5)


def test_a_nan_score_is_an_error_not_a_hit():
    # A NaN ranks last at every k, even a k above the number of classes (3 here).
    from alexnet.metrics import missed

    scores = torch.tensor([[float("nan")] * 3, [0.1, 0.7, 0.2]])
    rank = label_ranks(scores, torch.tensor([0, 1]))
    assert rank[1] == 0 and all(missed(rank, k).tolist() == [True, False] for k in (1, 5, 1000))
    results = Results(torch.tensor([0, 1]), torch.tensor([0, 1]), rank, rank)
    assert results.summary()["top5_error"] == 0.5 == results.summary()["center_top1_error"]


def test_the_ui_summary_lists_the_worst_classes_as_the_report_does():
    from alexnet.eval_files import csv_bytes, markdown_summary, worst_first

    rows = [
        {
            "index": i,
            "wnid": f"n{i}",
            "name": f"c{i}",
            "images": n,
            "top1_error": e,
            "top5_error": 0.0,
        }
        for i, (n, e) in enumerate([(4, 0.25), (0, None), (4, 0.75), (4, 0.5)])
    ]
    summary = {"top1_error": 0.5, "top5_error": 0.0, "center_top1_error": 0.5}
    text = markdown_summary({**summary, "center_top5_error": 0.0, "images": 12}, rows, worst=2)
    listed = [line.split(" (")[0].strip("| ") for line in text.splitlines() if "(n" in line]
    assert listed == ["c2", "c3"]  # highest top-1 error first; a class without images never
    # `alexnet report` orders the rows read back from the CSV (strings) the same way
    read = list(__import__("csv").DictReader(csv_bytes(rows).decode().splitlines()))
    assert [row["name"] for row in worst_first(read)] == ["c2", "c3", "c0", "c1"]


def test_an_empty_split_has_no_error_rate_rather_than_a_perfect_one(tmp_path):
    from alexnet.lmdb_store import StoreError, write_store

    write_store(tmp_path / "val", [], "raw", CLASSES, size=256)
    split = LmdbSplit(tmp_path / "val")
    model = CropTable(torch.zeros(10, 2))
    with pytest.raises(StoreError, match=r"val: no images to evaluate$"):
        evaluate(model, split, None, 224, 4, torch.device("cpu"))


def test_a_run_stopped_between_two_files_keeps_the_previous_set(tmp_path, monkeypatch):
    # eval/ is replaced whole, then eval.json: a run stopped after per_class.csv and
    # confusion.csv, at the figure, keeps every previous file and the previous summary
    # (never a new per-class report beside the last run's figures), and leaves nothing.
    import alexnet.eval_files as files
    from alexnet.atomic import OWNED

    rows = [{"index": 0, "name": "c0", "top1_error": 0.5}]
    files.write_evaluation(tmp_path, {"top1_error": 0.5}, rows, rows, {"kernels": b"1"}, {})
    before = {p.name: p.read_bytes() for p in (tmp_path / "eval").iterdir()}
    assert sorted(before) == sorted([OWNED, "per_class.csv", "confusion.csv", "kernels.png"])
    written = []
    write_bytes = files.write_bytes

    def stopped_at_the_figure(path, data):
        if path.suffix == ".png":
            raise KeyboardInterrupt
        write_bytes(path, data)
        written.append(path.name)

    monkeypatch.setattr(files, "write_bytes", stopped_at_the_figure)
    new_rows = [{"index": 0, "name": "c0", "top1_error": 0.1}]
    with pytest.raises(KeyboardInterrupt):
        files.write_evaluation(
            tmp_path, {"top1_error": 0.1}, new_rows, new_rows, {"kernels": b"2"}, {}
        )
    assert written == ["per_class.csv", "confusion.csv"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "eval").iterdir()} == before
    assert json.loads((tmp_path / "eval.json").read_text()) == {"top1_error": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "eval.json"]


def test_a_rerun_leaves_no_file_of_a_killed_run(tmp_path):
    # What evaluate killed (SIGKILL: no cleanup) left: half a per-class report in the
    # folder git tracks, and a half-written folder beside it; the next run removes both.
    import alexnet.eval_files as files
    from tests.helpers import DEAD_PID

    rows = [{"index": 0, "name": "c0", "top1_error": 0.5}]
    files.write_evaluation(tmp_path, {"top1_error": 0.5}, rows, rows, {"kernels": b"1"}, {})
    (tmp_path / "eval" / f".per_class.csv.tmp-{DEAD_PID}").write_bytes(b"index,na")
    (tmp_path / f".eval.tmp-{DEAD_PID}").mkdir()
    (tmp_path / f".eval.json.tmp-{DEAD_PID}").write_bytes(b"{")
    files.write_evaluation(tmp_path, {"top1_error": 0.1}, rows, rows, {"kernels": b"2"}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "eval.json"]
    assert not [p.name for p in (tmp_path / "eval").iterdir() if ".tmp-" in p.name]


def test_evaluate_refuses_a_folder_of_other_files_before_any_work(tmp_path):
    # eval/ is replaced whole: a folder without evaluate's mark (the user's, or another
    # stage's output named as --metrics) is refused before hours of evaluation.
    from alexnet.atomic import OutputError
    from alexnet.eval_files import check_targets

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "notes.txt").write_bytes(b"mine")
    with pytest.raises(OutputError, match="eval: holds files and not the"):
        check_targets(tmp_path)
    assert (tmp_path / "eval" / "notes.txt").read_bytes() == b"mine"


def test_evaluate_refuses_stores_of_another_image_size(data, model_file, tmp_path, prefect_server):
    # The model's mean image is 256x256: each crop's window of it is subtracted. A store
    # packed from a prepare of another size failed with a tensor traceback mid-run.
    from alexnet.lmdb_store import StoreError, write_store
    from alexnet.modelfile import ModelFileError
    from alexnet.params import ComputeParams, EvaluateParams
    from flows.evaluate import evaluate_flow

    small = [(0, np.zeros((128, 128, 3), np.uint8).tobytes())]
    classes = LmdbSplit(data / "lmdb" / "val").classes
    write_store(tmp_path / "small", [small], "raw", classes, size=128)
    stores = {"val": data / "lmdb" / "val", "train": data / "lmdb" / "train"}
    refused = {
        "val": (ModelFileError, r"was trained on 256x256 images, \S+/small holds 128x128: "),
        "train": (StoreError, r"\S+/small holds 128x128 images, \S+/val 256x256: pack both"),
    }
    for role, (error, expected) in refused.items():
        given = {**stores, role: tmp_path / "small"}
        with pytest.raises(error, match=expected):
            evaluate_flow(
                str(given["val"]),
                str(model_file),
                str(given["train"]),
                str(tmp_path / "metrics"),
                EvaluateParams(),
                ComputeParams(),
            )
    assert not (tmp_path / "metrics").exists()


def test_the_top5_table_puts_a_class_tied_with_the_label_before_it():
    # As the top-5 error counts it: the label of a 6-way tie is not in the top 5 (topk
    # put it first, by its lower index).
    kept = torch.log(torch.tensor([[0.15] * 6 + [0.1]]))
    rows = top5_table([0], [0], kept, [f"c{i}" for i in range(7)])
    assert [row["class"] for row in rows] == ["c1", "c2", "c3", "c4", "c5"]
    assert label_ranks(kept, torch.tensor([0])).item() == 5
