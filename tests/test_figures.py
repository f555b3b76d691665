"""Section 6.1's figures (conv1's kernels, the top-5 gallery, the nearest neighbours in
the last hidden layer) and the self-contained report page."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.evaluate import crop_log_probabilities, evaluate, sample, top5_table
from alexnet.figures import (
    BLOCK_GREY,
    OTHER,
    PER_ROW,
    TRUE,
    kernel_cells,
    kernels_figure,
    mosaic,
    png,
    top5_figure,
)
from alexnet.lmdb_store import write_store
from alexnet.model import AlexNet
from alexnet.neighbours import Neighbours, hidden_vectors, keep_nearest, nearest
from alexnet.reader import LmdbSplit
from alexnet.train_files import series_folder
from tests.helpers import CLASSES, REPO, blobs, run_python

MEAN = torch.full((3, 256, 256), 60.0)
CPU = torch.device("cpu")


def test_each_kernel_is_stretched_to_its_own_range():
    weight = torch.randn(6, 3, 11, 11, generator=torch.Generator().manual_seed(0))
    weight *= torch.tensor([1.0, 10.0, 0.01, 1.0, 1.0, 1.0])[:, None, None, None]
    weight[5] = 0.3  # constant: no range to stretch
    cells = kernel_cells(weight)
    assert cells.shape == (6, 11, 11, 3)
    for i in range(5):
        hwc = weight[i].permute(1, 2, 0).numpy()
        assert np.allclose(cells[i], (hwc - hwc.min()) / (hwc.max() - hwc.min()), atol=1e-6)
    assert np.all(cells[5] == 0.5)


def test_a_mosaic_puts_each_cell_in_its_place_and_fills_the_rest():
    cells = np.arange(5 * 2 * 3 * 3, dtype=float).reshape(5, 2, 3, 3)  # 5 cells of 2x3
    grid = mosaic(cells, per_row=2, fill=-1.0)
    expected = np.full((3 * 3 - 1, 2 * 4 - 1, 3), -1.0)  # 3 rows of 2, a pixel apart
    for i, cell in enumerate(cells):
        row, place = divmod(i, 2)
        expected[row * 3 : row * 3 + 2, place * 4 : place * 4 + 3] = cell
    assert np.array_equal(grid, expected)


@pytest.mark.parametrize("columns", [2, 1])
def test_the_kernel_grid_has_a_cell_per_kernel_and_a_block_per_column(columns):
    weight = AlexNet(num_classes=3, columns=columns).layers()["conv1"].weight
    figure = kernels_figure(weight, columns)
    blocks = [ax for ax in figure.axes if ax.images]
    assert len(blocks) == columns  # one image a block
    expected = np.split(kernel_cells(weight), columns)
    background = BLOCK_GREY if columns > 1 else 1.0
    for ax, cells in zip(blocks, expected, strict=True):
        grid = np.asarray(ax.images[0].get_array())
        assert np.array_equal(grid, mosaic(cells, PER_ROW, background))
        assert grid.shape == (3 * 12 - 1, PER_ROW * 12 - 1, 3)  # figure 3: 3 rows of 16
    # The paper's layout: the first half of the kernels (column 1) in the upper block.
    parents = [ax.get_figure(root=False) for ax in blocks]
    assert len(set(parents)) == columns
    if columns == 2:
        assert parents == list(figure.subfigs)
        titles = [sub.get_suptitle() for sub in figure.subfigs]
        assert titles == ["column 1 (GPU 1 in the paper)", "column 2 (GPU 2 in the paper)"]
    image = Image.open(io.BytesIO(png(figure)))
    assert image.format == "PNG" and image.width > 600 and image.height > 200


def test_the_gallery_names_the_true_class_and_marks_it_when_in_the_top5():
    names = [f"class {i}" for i in range(8)]
    scores = torch.tensor([[8.0, 7, 6, 5, 4, 3, 2, 1], [1.0, 2, 3, 4, 5, 6, 7, 8]])
    probabilities = torch.softmax(scores, 1)
    labels = [2, 0]  # third most probable; least probable (not in the top 5)
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    figure = top5_figure(images, labels, probabilities.log(), names, per_row=2)
    pictures = [ax for ax in figure.axes if ax.images]
    bars = [ax for ax in figure.axes if ax.patches]
    assert [ax.get_title() for ax in pictures] == ["class 2", "class 0"]
    shown = [[t.get_text() for t in ax.get_yticklabels()] for ax in bars]
    assert shown == [names[:5], names[::-1][:5]]
    colours = [[patch.get_facecolor() for patch in ax.patches] for ax in bars]
    from matplotlib.colors import to_rgba

    assert colours[0] == [to_rgba(c) for c in (OTHER, OTHER, TRUE, OTHER, OTHER)]
    assert colours[1] == [to_rgba(OTHER)] * 5
    widths = [patch.get_width() for patch in bars[0].patches]
    assert widths == pytest.approx(probabilities[0, :5].tolist())


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """23 training records of two classes."""
    root = tmp_path_factory.mktemp("neighbours")
    write_store(root / "train", [blobs(0, 12, 5) + blobs(1, 11, 6)], "raw", CLASSES, size=256)
    return LmdbSplit(root / "train")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AlexNet(num_classes=2, init="kaiming").eval()


def test_the_neighbours_are_the_brute_force_nearest(store, model):
    images, labels = store.read_batch(range(len(store)))
    every = hidden_vectors(model, images, MEAN, 224)
    fresh = torch.frombuffer(bytearray(blobs(1, 1, 8)[0][1]), dtype=torch.uint8)
    queries = torch.stack([fresh.reshape(256, 256, 3).permute(2, 0, 1), images[4]])
    vectors = hidden_vectors(model, queries, MEAN, 224)
    found = nearest(model, vectors, store, MEAN, 224, k=6, batch=5, device=CPU)
    direct = ((vectors[:, None, :] - every[None, :, :]) ** 2).sum(-1).sqrt()
    expected = direct.argsort(1)[:, :6]
    for q in range(2):
        assert set(found.indices[q].tolist()) == set(expected[q].tolist())
        assert found.distances[q].tolist() == sorted(found.distances[q].tolist())
        # atol: the features of one image differ by float noise with the batch it is in
        # (here 5 a batch, there all 23), which puts ~1e-3 on a distance of 0
        assert torch.allclose(found.distances[q], direct[q, found.indices[q]], rtol=1e-4, atol=1e-2)
    assert torch.equal(found.labels, labels[found.indices])
    # A training image is its own nearest neighbour.
    assert found.indices[1, 0] == 4 and found.distances[1, 0] < 1e-3 * found.distances[1, 1]
    # k beyond the store: every record, once.
    everything = nearest(model, vectors, store, MEAN, 224, k=50, batch=7, device=CPU)
    assert sorted(everything.indices[0].tolist()) == list(range(len(store)))


def test_the_search_holds_one_batch_of_images_at_a_time(store, model, monkeypatch):
    sizes = []
    hidden = model.hidden
    monkeypatch.setattr(model, "hidden", lambda x: sizes.append(len(x)) or hidden(x))
    nearest(model, torch.zeros(3, 4096), store, MEAN, 224, k=2, batch=4, device=CPU)
    assert sizes == [4] * 5 + [3]


def test_ties_go_to_the_lower_index():
    best = Neighbours(torch.tensor([[7, 2]]), torch.tensor([[1, 0]]), torch.tensor([[1.0, 2.0]]))
    batch = Neighbours(torch.tensor([[1, 9]]), torch.tensor([[0, 1]]), torch.tensor([[2.0, 1.0]]))
    kept = keep_nearest(best, batch, 3)
    assert kept.indices.tolist() == [[7, 9, 1]] and kept.labels.tolist() == [[1, 1, 0]]
    assert kept.distances.tolist() == [[1.0, 1.0, 2.0]]


def test_evaluate_keeps_the_10_crop_softmax_of_the_chosen_images(store, model):
    chosen = sample(len(store), 5, seed=3)
    assert chosen == sample(len(store), 5, seed=3) and len(set(chosen)) == 5
    results = evaluate(model, store, MEAN, 224, 4, CPU, keep=chosen)
    images, labels = store.read_batch(chosen)
    direct = crop_log_probabilities(model, images, MEAN, 224).exp().mean(1)  # the paper's mean
    assert torch.allclose(results.kept.exp(), direct, atol=1e-6)
    rows = top5_table(chosen, labels.tolist(), results.kept, ["c0", "c1"])
    assert [r["key"] for r in rows] == [f"{i:08d}" for i in chosen for _ in range(2)]
    assert [r["true_class"] for r in rows[::2]] == [f"c{int(x)}" for x in labels]


def write_run(folder, figures=True) -> dict[str, bytes]:
    """A metrics folder as the stages write it, with small stand-in figures."""
    (folder / "eval").mkdir(parents=True)
    (folder / "train" / "plots" / "metrics").mkdir(parents=True)
    evaluation = {
        "top1_error": 0.25,
        "top5_error": 0.0625,
        "center_top1_error": 0.3,
        "center_top5_error": 0.1,
        "images": 16,
    }
    (folder / "eval.json").write_text(json.dumps(evaluation))
    (folder / "train.json").write_text(json.dumps({"train_loss": 0.5, "epochs": 2}))
    for name, values in {"train_loss": [2.3, 1.1], "val_top1_error": [0.9, 0.5]}.items():
        rows = "".join(f"{step}\t{value}\n" for step, value in enumerate(values))
        (folder / "train" / "plots" / "metrics" / f"{name}.tsv").write_text(f"step\t{name}\n{rows}")
    (folder / "train" / "params.yaml").write_text("train:\n  lr: 0.125\n")  # dvclive's record
    (folder / "eval" / "per_class.csv").write_text(
        "class,wnid,name,images,top1_error,top5_error\n0,n0,<c0>,8,0.25,0.0\n1,n1,c1,8,0.5,0.1\n"
    )
    written = {}
    if figures:
        for i, name in enumerate(("kernels", "top5", "neighbours")):
            buffer = io.BytesIO()
            Image.new("RGB", (8 + i, 8), (i * 80, 0, 0)).save(buffer, "PNG")
            written[name] = buffer.getvalue()
            (folder / "eval" / f"{name}.png").write_bytes(written[name])
    return written


def test_the_report_is_one_page_with_everything_inside(tmp_path):
    from alexnet.report import render

    figures = write_run(tmp_path / "metrics")
    page = render(tmp_path / "metrics")
    sources = re.findall(r'src="([^"]+)"', page)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    embedded = [base64.b64decode(s.split(",", 1)[1]) for s in sources]
    assert embedded[1:] == list(figures.values())  # the curves first, then the figures
    assert Image.open(io.BytesIO(embedded[0])).width > 400  # the curves, drawn here
    assert not re.search(r"<script|<link|https?://", page)  # opens without a network
    assert "0.2500" in page and "0.0625" in page and "&lt;c0&gt;" in page  # escaped
    # the params the run recorded, not params.yaml as it is now (edited since, say)
    assert "lr: 0.125" in page


def test_the_report_says_which_stage_writes_what_is_missing(tmp_path):
    from alexnet.report import render

    write_run(tmp_path / "metrics", figures=False)
    (tmp_path / "metrics" / "train.json").unlink()
    (tmp_path / "metrics" / "train" / "params.yaml").unlink()
    (tmp_path / "metrics" / "eval" / "per_class.csv").unlink()  # a clone's, before dvc pull
    page = render(tmp_path / "metrics")
    assert page.count("the evaluate stage writes it") == 4
    assert "No eval/per_class.csv here: the evaluate stage writes it" in page
    assert "No train.json yet: the train stage writes it" in page
    assert "No train/params.yaml here: the train stage writes it" in page


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ('{"top1_error": 0.2', "not readable JSON"),
        ("[0.2, 0.01]", "not a JSON object"),
        ('{"top1_error": 0.2, "top5_error": 0.01, "images": 4}', "no center_top1_error"),
    ],
    ids=["cut short", "not an object", "an older version's"],
)
def test_a_damaged_eval_json_is_one_error_line_not_a_traceback(tmp_path, content, reason):
    from alexnet.errors import AlexnetError
    from alexnet.report import render

    write_run(tmp_path / "metrics", figures=False)
    (tmp_path / "metrics" / "eval.json").write_text(content)
    with pytest.raises(AlexnetError, match=rf"eval.json: {reason}"):
        render(tmp_path / "metrics")


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        (
            "eval.json",
            '{"top1_error": null, "top5_error": 0.1, "center_top1_error": 0.2, '
            '"center_top5_error": 0.1, "images": 4}',
            "its top1_error is not a number",
        ),
        (
            "eval.json",
            '{"top1_error": "0.2", "top5_error": 0.1, "center_top1_error": 0.2, '
            '"center_top5_error": 0.1, "images": 4}',
            "its top1_error is not a number",
        ),
        ("eval/per_class.csv", "class,wnid,name,images\n0,n0,c0,8\n", "no top1_error column"),
        ("eval/per_class.csv", "class,top1_error\n0,half\n", "a top1_error that is not a number"),
        ("eval/per_class.csv", b"class,top1_error\n0,\xff\n", "not readable"),
        ("train/plots/metrics/lr.tsv", b"step\tlr\n0\t\xff\n", "not readable"),
    ],
    ids=["null", "a string", "no column", "not a number", "not text", "a series not text"],
)
def test_a_damaged_metrics_file_is_one_error_line_not_a_traceback(tmp_path, name, content, reason):
    # each was a traceback: a TypeError in the page's template, a KeyError, a UnicodeDecodeError
    from alexnet.errors import AlexnetError
    from alexnet.report import render

    write_run(tmp_path / "metrics", figures=False)
    path = tmp_path / "metrics" / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    with pytest.raises(AlexnetError, match=rf"{path.name}: {reason}"):
        render(tmp_path / "metrics")


@pytest.mark.parametrize("names", [("lr",), ("lr", "images_per_s"), ("train_loss",)])
def test_the_curves_of_one_panel_or_of_a_header_alone_make_a_page(tmp_path, names):
    # one panel's series alone (a run killed between dvclive's writes) was a TypeError
    from alexnet.report import render

    write_run(tmp_path / "metrics", figures=False)
    series = tmp_path / "metrics" / "train" / "plots" / "metrics"
    for path in series.iterdir():
        path.unlink()
    for name in names:
        (series / f"{name}.tsv").write_text(f"step\t{name}\n0\t0.5\n1\t0.25\n")
    (series / "val_loss.tsv").write_text("step\tval_loss\n")  # a header alone: no curve
    page = render(tmp_path / "metrics")
    (curves,) = re.findall(r'alt="training curves" src="data:image/png;base64,([^"]+)"', page)
    assert Image.open(io.BytesIO(base64.b64decode(curves))).width < 600  # one panel


def test_alexnet_report_writes_the_page_or_one_error_line(tmp_path):
    write_run(tmp_path / "metrics")
    command = [sys.executable, "-m", "flows.cli", "report", "--metrics"]
    done = subprocess.run(
        [*command, str(tmp_path / "metrics"), "-o", str(tmp_path / "r.html")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "r.html").read_text().startswith("<!doctype html>")
    missing = subprocess.run(
        [*command, str(tmp_path / "none")], cwd=tmp_path, capture_output=True, text=True
    )
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert "no such folder" in missing.stderr and not (tmp_path / "report.html").exists()
    # a file, or a folder without the stages' metrics (a wrong --metrics): named as such
    (tmp_path / "empty").mkdir()
    for wrong, line in (
        (tmp_path / "r.html", "a file, not the stages' metrics folder"),
        (tmp_path / "empty", "neither train's nor evaluate's metrics are there"),
    ):
        done = subprocess.run([*command, str(wrong)], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 1 and done.stderr.startswith(f"error: {wrong}: {line}")
        assert done.stderr.count("\n") == 1 and not (tmp_path / "report.html").exists()
    # a first run still training has only its curves so far: a page of them
    series_folder(tmp_path / "empty").mkdir(parents=True)
    done = subprocess.run(
        [*command, str(tmp_path / "empty"), "-o", "r.html"], cwd=tmp_path, capture_output=True
    )
    assert done.returncode == 0 and (tmp_path / "r.html").exists(), done.stderr


def test_the_report_is_written_without_torch(tmp_path):
    # `alexnet report` only reads files: torch (~2 s of its ~4 to import) is not needed.
    write_run(tmp_path / "metrics")
    code = (
        "from pathlib import Path; from alexnet.report import write_report\n"
        f"write_report(Path({str(tmp_path / 'metrics')!r}), Path({str(tmp_path / 'r.html')!r}))"
    )
    done = run_python(code, blocked=("torch",))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "r.html").read_text().count('src="data:image/png;base64,') > 1


def test_a_series_line_cut_short_by_a_kill_is_left_out(tmp_path):
    # dvclive appends in place: a killed run can leave half a line at the end.
    from alexnet.report import read_series

    (tmp_path / "train_loss.tsv").write_text(
        "timestamp\tstep\ttrain_loss\n1\t0\t2.3\n2\t1\t1.9\n3\t2\n4\t3\t1.\n5\t"
    )
    assert read_series(tmp_path) == {"train_loss": ([1, 2, 4], [2.3, 1.9, 1.0])}
