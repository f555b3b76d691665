"""The ImageNet preset: the paper's values, valid, and the prepare stage reads an
ILSVRC-2012 tree (train folders + flat val + Kaggle CSV) with it."""

from __future__ import annotations

import subprocess
import sys

import yaml

from alexnet.params import load_params, parse_params
from tests.helpers import REPO, jpeg


def test_imagenet_preset_is_the_papers_recipe():
    params = load_params(REPO / "params.imagenet.yaml")
    assert (params.train.epochs, params.train.batch_size, params.train.lr) == (90, 128, 0.01)
    assert (params.train.momentum, params.train.weight_decay) == (0.9, 5e-4)
    assert params.model.init == "paper" and params.model.columns == 2
    # sections 3.3-3.4 (LRN, overlapping pooling), 4.1 (crops, flips, lighting), 4.2
    # (dropout), 5 (three drops, the velocity's rule), and section 2's 256x256 images
    model, train = params.model, params.train
    assert (model.lrn, model.overlap_pool, model.dropout) == (True, True, 0.5)
    assert (train.random_crop, train.flip, train.lighting) == (True, True, 0.1)
    assert (train.max_lr_drops, train.velocity, params.prepare.size) == (3, "paper", 256)
    assert params.prepare.raw.startswith("/")  # outside the repo
    assert params.train.device == ("cuda",) and params.compute.kernels == "fast"


def ilsvrc_tree(root, classes=("n01440764", "n01443537"), per_class=3, val=2):
    for c, wnid in enumerate(classes):
        folder = root / "train" / wnid
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"{wnid}_{i}.JPEG").write_bytes(jpeg(320 + 10 * i, 240, seed=c * 10 + i))
    (root / "val").mkdir()
    rows = ["ImageId,PredictionString"]
    for c, wnid in enumerate(classes):
        for i in range(val):
            name = f"ILSVRC2012_val_{c * val + i + 1:08d}"
            (root / "val" / f"{name}.JPEG").write_bytes(jpeg(300, 280, seed=100 + c * 10 + i))
            rows.append(f"{name},{wnid} 10 20 200 200")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    (root / "LOC_synset_mapping.txt").write_text(
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n"
    )
    return root


def test_prepare_reads_an_ilsvrc_tree_with_the_preset(tmp_path):
    raw = ilsvrc_tree(tmp_path / "ILSVRC2012")
    preset = yaml.safe_load((REPO / "params.imagenet.yaml").read_text())
    preset["prepare"]["raw"] = str(raw)
    preset["compute"]["workers"] = 1
    parse_params(preset)  # still valid with the one value a user sets
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(preset))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "prepare",
            str(raw),
            str(tmp_path / "prepared"),
            "-p",
            str(tmp_path / "params.yaml"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "10 kept" in done.stderr or "10 kept" in done.stdout
    assert [p.name for p in (tmp_path / "prepared" / "val").glob("*.tar")] == ["shard-00000.tar"]
