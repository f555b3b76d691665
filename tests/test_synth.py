"""The built-in demo dataset: deterministic, varied, with every oddity."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from alexnet.imageops import BadImage, prepare_image
from alexnet.params import SynthParams
from alexnet.sources import open_source
from alexnet.synth import (
    ODDITIES,
    SHAPES,
    TEXTURES,
    Job,
    image_rng,
    plan_jobs,
    render,
    run_job,
    synth_classes,
    write_mapping,
    write_oddities,
)


def test_the_schema_allows_as_many_classes_as_there_are_shapes():
    # `synth.classes`' bound is the number of drawable classes, not a number of its own:
    # a class past the shapes would be a validated params file that fails in synth.
    (bound,) = [m.le for m in SynthParams.model_fields["classes"].metadata if hasattr(m, "le")]
    assert bound == len(SHAPES) == len(TEXTURES)
    names = [c.name for c in synth_classes(bound)]
    assert len(set(names)) == bound


def test_same_seed_same_image_and_different_seeds_differ():
    a = np.asarray(render(3, image_rng(0, "train", 3, 5)))
    b = np.asarray(render(3, image_rng(0, "train", 3, 5)))
    c = np.asarray(render(3, image_rng(1, "train", 3, 5)))
    assert np.array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)


def test_sizes_and_aspects_span_the_requested_range():
    sizes = [render(k % 10, image_rng(0, "train", k % 10, k)).size for k in range(40)]
    sides = [s for size in sizes for s in size]
    aspects = [w / h for w, h in sizes]
    assert min(sides) >= 160 and max(sides) <= 1000
    assert max(sides) > 700 and min(sides) < 400
    assert min(aspects) >= 0.49 and max(aspects) <= 2.01
    assert min(aspects) < 0.8 and max(aspects) > 1.25


def test_colour_alone_does_not_tell_the_class():
    # The mean colour of a class varies much more within the class than between classes.
    means = np.array(
        [
            [np.asarray(render(k, image_rng(0, "train", k, i))).mean((0, 1)) for i in range(6)]
            for k in range(4)
        ]
    )
    within = means.std(axis=1).mean()
    between = means.mean(axis=1).std(axis=0).mean()
    assert within > between


def test_a_task_that_starts_after_its_stage_stopped_writes_nothing(tmp_path):
    # A Ctrl-C while the pool's workers still imported: the stage removed its temporary
    # folder, then a task handed out before the stop made it again, and left it.
    (job,) = plan_jobs(classes=1, train_per_class=1, val_per_class=0, chunk=1)
    gone = tmp_path / ".raw.tmp-host-1"
    with pytest.raises(FileNotFoundError):
        run_job(job, gone, seed=0, min_side=160, max_side=200, quality=90, clutter=2)
    assert list(tmp_path.iterdir()) == []


def test_layout_mapping_and_oddities(tmp_path):
    for job in plan_jobs(classes=3, train_per_class=2, val_per_class=1, chunk=2):
        run_job(job, tmp_path, seed=0, min_side=160, max_side=300, quality=90, clutter=8)
    assert write_oddities(tmp_path, classes=3, per_kind=1, seed=0, quality=90) == len(ODDITIES)
    write_mapping(tmp_path, 3)
    source = open_source(tmp_path)
    assert [c.name for c in source.classes] == [c.name for c in synth_classes(3)]
    assert len(source.splits["train"]) == 3 * 2 + len(ODDITIES)
    assert len(source.splits["val"]) == 3

    outcome = {}
    for sample in source.splits["train"]:
        kind = next((k for k in ODDITIES if f"_odd_{k}_" in sample.path.name), None)
        if kind is None:
            continue
        data = sample.path.read_bytes()
        try:
            outcome[kind] = prepare_image(data, ".JPEG").converted
        except BadImage as error:
            outcome[kind] = f"bad: {error}"
    assert outcome["cmyk"] == "CMYK" and outcome["grey"] == "L"
    assert outcome["png"] == "PNG as JPEG"
    assert outcome["truncated"].startswith("bad: corrupt")
    assert outcome["empty"] == "bad: empty file" and outcome["notimage"] == "bad: not an image"
    assert (
        Image.open(io.BytesIO(next(iter(source.splits["val"])).path.read_bytes())).format == "JPEG"
    )


def test_jobs_cover_every_image_once():
    jobs = plan_jobs(classes=2, train_per_class=7, val_per_class=3, chunk=3)
    covered = [(j.split, label, n) for j in jobs for label, n in j.images()]
    expected = [
        (split, label, n)
        for split, per_class in (("train", 7), ("val", 3))
        for label in range(2)
        for n in range(per_class)
    ]
    assert covered == expected  # each once, in order
    assert Job("train", 7, 6, 3).images() == [(0, 6), (1, 0), (1, 1)]  # spans two classes


def test_files_do_not_depend_on_how_the_work_is_cut(tmp_path):
    def draw(chunk: int) -> dict[str, bytes]:
        root = tmp_path / str(chunk)
        root.mkdir(exist_ok=True)  # (the stage's temporary folder)
        for job in plan_jobs(classes=3, train_per_class=2, val_per_class=1, chunk=chunk):
            run_job(job, root, seed=3, min_side=160, max_side=200, quality=90, clutter=2)
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*.JPEG")}

    assert len(draw(1)) == 9
    assert draw(1) == draw(4)
