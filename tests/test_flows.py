"""The synth and prepare flows under a Prefect test server: determinism across worker
counts and task runners (process pool, Dask), and resuming after a kill."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from alexnet.decoder import AGAIN_NEXT_RUN
from alexnet.params import PrepareParams
from alexnet.prepare import PrepareError
from alexnet.shards import ShardError, load_classes
from flows.prepare import prepare_flow
from flows.runners import LOCAL_CLUSTER, local_cluster, task_runner
from flows.synth import synth_flow
from tests.helpers import DEAD_PID, REPO, SHARDS, TINY, jpeg, make_imagefolder, shard_bytes

pytestmark = pytest.mark.usefixtures("prefect_server")


@task(cache_policy=NO_CACHE)
def worker_children() -> int:
    import multiprocessing

    return len(multiprocessing.active_children())


def test_a_pool_worker_runs_its_tasks_without_processes_of_its_own():
    # Prefect enters a copy of the flow's task runner around every task a pool worker
    # runs. When that copy started its own workers, each task spawned two processes
    # (~2 s a task on 2 cores).
    @flow(task_runner=task_runner(None, 2))
    def children() -> list[int]:
        return [future.result() for future in [worker_children.submit() for _ in range(4)]]

    assert children() == [0, 0, 0, 0]


def test_synth_is_deterministic_across_worker_counts(raw, tmp_path):
    again = tmp_path / "raw"
    killed = tmp_path / f".raw.tmp-{DEAD_PID}"  # what a killed run left: half a dataset
    (killed / "train").mkdir(parents=True)
    synth_flow.with_options(task_runner=task_runner(None, 1))(str(again), TINY)
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]
    files = sorted(p.relative_to(raw) for p in raw.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((raw / f).read_bytes() == (again / f).read_bytes() for f in files)


def test_prepare_report_counts_every_oddity(reference):
    out, counts = reference
    assert counts == {"files": 30, "kept": 27, "converted": 3, "skipped": 3}
    import json

    report = json.loads((out / "report.json").read_text())
    reasons = sorted(s["reason"].split(":")[0] for s in report["skipped_files"])
    assert reasons == ["corrupt", "empty file", "not an image"]
    assert sorted(c["from"] for c in report["converted_files"]) == ["CMYK", "L", "PNG as JPEG"]
    classes = json.loads((out / "classes.json").read_text())
    assert [c["index"] for c in classes] == [0, 1, 2]


@pytest.mark.parametrize(("scheduler", "workers"), [(None, 2), ("local", 2)])
def test_prepare_shards_identical_whatever_the_runner(raw, reference, tmp_path, scheduler, workers):
    # (and leaves os.environ as it was: conftest's `environment_kept` checks every test)
    out = tmp_path / "prep"
    prepare_flow.with_options(task_runner=task_runner(scheduler, workers))(
        str(raw), str(out), SHARDS
    )
    expected = shard_bytes(reference[0])
    assert len(expected) == 6 + 2  # 24 train and 6 val files, 4 per shard
    assert shard_bytes(out) == expected
    assert (out / "report.json").read_bytes() == (reference[0] / "report.json").read_bytes()


def test_a_local_dask_cluster_leaves_the_environment_and_limits_its_workers_threads():
    # distributed's nannies write their workers' thread limits (OMP_NUM_THREADS=1, ...)
    # into the starting process's os.environ: a train command started from it later
    # would train on one thread and compute other bits than the same run on all cores.
    from distributed import Client

    before = dict(os.environ)
    options = {**LOCAL_CLUSTER, "n_workers": 1}
    with local_cluster(**options) as cluster, Client(cluster) as client:
        during = dict(os.environ)
        workers = client.run(os.getenv, "OMP_NUM_THREADS")  # read there
    assert during == before  # and after: conftest's `environment_kept`
    assert list(workers.values()) == [before.get("OMP_NUM_THREADS", "1")]


def test_a_local_dask_clusters_workers_drop_a_heartbeat_to_a_closed_scheduler():
    # The scheduler of a temporary cluster closes with the stage; a worker's heartbeat
    # under way then logged a page of traceback beside the stage's last line
    # (dask/distributed#7891; CI saw it under a Ctrl-C). Asked of the live worker, as
    # it has its logging set up.
    from distributed import Client
    from distributed.comm.core import CommClosedError

    from tasks.quiet import HEARTBEAT_FAILED

    def shown(message: str, error: BaseException) -> bool:  # run there (a local function)
        info = (type(error), error, None)
        record = logging.LogRecord("distributed.worker", logging.ERROR, "", 0, message, (), info)
        return bool(logging.getLogger("distributed.worker").filter(record))

    cases = [(HEARTBEAT_FAILED, CommClosedError("closed")), (HEARTBEAT_FAILED, ValueError())]
    cases += [("Compute Failed", CommClosedError("closed"))]
    with local_cluster(**{**LOCAL_CLUSTER, "n_workers": 1}) as cluster, Client(cluster) as client:
        answers = [next(iter(client.run(shown, *case).values())) for case in cases]
    assert answers == [False, True, True]


def test_two_local_dask_clusters_at_once_start_without_a_taken_port():
    # distributed's scheduler serves HTTP on 8787 unless told otherwise, dashboard or
    # not: the second cluster on a machine (another stage's, another test worker's)
    # warned "Port 8787 is already in use". (No workers: the schedulers hold the ports.)
    options = {**LOCAL_CLUSTER, "n_workers": 0}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with local_cluster(**options), local_cluster(**options):
            pass
    assert not [str(w.message) for w in caught if "already in use" in str(w.message)]


def test_rerun_after_simulated_kill_reuses_complete_shards(raw, reference, tmp_path):
    out = tmp_path / "prep"
    run = prepare_flow.with_options(task_runner=task_runner(None, 2))
    run(str(raw), str(out), SHARDS)
    # What a kill leaves: shards 3.. never renamed into place, a half-written temporary,
    # and a stale shard from an earlier, larger input.
    for path in sorted((out / "train").glob("shard-*.tar"))[3:]:
        path.unlink()
    (out / "train" / f".shard-00003.tar.tmp-{DEAD_PID}").write_bytes(b"half a tar")
    (out / f".report.json.tmp-{DEAD_PID}").write_bytes(b"half a report")
    (out / "train" / "shard-00042.tar").write_bytes(b"stale")
    made = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("shard-*.tar")}
    run(str(raw), str(out), SHARDS)
    assert shard_bytes(out) == shard_bytes(reference[0])
    assert not list(out.glob("**/.*tmp*"))
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("shard-0000[012].tar")}
    assert kept == {k: v for k, v in made.items() if k in kept}  # reused, not rewritten


def test_too_many_skipped_files_fail_after_writing_the_report(tmp_path):
    # ... and without classes.json, which the next stages read: they accepted the output
    # of a failed prepare (an earlier success's classes.json included) and trained on it.
    root = make_imagefolder(tmp_path / "raw", classes=2, train=2, val=1)
    for i in range(2):
        (root / "train" / "n00000000" / f"bad{i}.JPEG").write_bytes(b"not a jpeg")
    out = tmp_path / "prep"
    prepare = prepare_flow.with_options(task_runner=task_runner(None, 1))
    prepare(str(root), str(out), PrepareParams(max_skipped=0.5))
    assert load_classes(out) and (out / "report.json").exists()
    with pytest.raises(PrepareError, match=r"2 of 8 files skipped"):
        prepare(str(root), str(out), PrepareParams(max_skipped=0.1))
    assert (out / "report.json").exists()
    with pytest.raises(ShardError, match=r"classes.json: no such file \(prepare writes it when"):
        load_classes(out)


def test_a_split_left_without_any_image_stops_the_stage(tmp_path):
    root = make_imagefolder(tmp_path / "raw")
    for path in (root / "val").rglob("*.JPEG"):
        path.write_bytes(b"not a jpeg")  # every validation file unusable
    with pytest.raises(PrepareError, match=r"raw/val: no usable image in this split, all 6 files"):
        prepare_flow.with_options(task_runner=task_runner(None, 1))(
            str(root), str(tmp_path / "prep"), PrepareParams(max_skipped=0.5)
        )


def test_real_sigkill_then_rerun_gives_the_same_shards(tmp_path, prefect_server):
    root = tmp_path / "raw"
    make_imagefolder(root, classes=2, train=1, val=1)
    for i in range(60):  # big images: slow enough to be killed in the middle
        (root / "train" / "n00000001" / f"big_{i:03d}.JPEG").write_bytes(jpeg(1600, 1200, i))
    (tmp_path / "params.yaml").write_text("prepare:\n  shard_size: 4\ncompute:\n  workers: 1\n")
    command = [
        sys.executable,
        "-m",
        "flows.cli",
        "prepare",
        str(root),
        str(tmp_path / "out"),
        "-p",
        str(tmp_path / "params.yaml"),
    ]
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(tmp_path.glob("out/train/shard-*.tar"))) < 3:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    survivors = {p.name for p in tmp_path.glob("out/train/shard-*.tar")}
    assert survivors, "the run was killed before any shard was written"
    # ... and before its end (the report is written last): a resume, not a repeat
    assert not (tmp_path / "out" / "report.json").exists()

    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    fresh = tmp_path / "fresh"
    prepare_flow.with_options(task_runner=task_runner(None, 1))(
        str(root), str(fresh), PrepareParams(shard_size=4)
    )
    assert shard_bytes(tmp_path / "out") == shard_bytes(fresh)
    assert len(survivors) < len(list((fresh / "train").glob("shard-*.tar")))
    assert not list(tmp_path.glob("out/**/.*tmp*"))


def test_stats_flow_same_bits_for_any_worker_count_and_equal_direct(reference, tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from alexnet.params import ComputeParams
    from alexnet.shards import iter_shard
    from flows.stats import stats_flow

    train = reference[0] / "train"
    for workers in (1, 2):
        # a window of one shard's moments for one worker: the same bits as one of all
        window = {1: 1, 2: 256}[workers]
        stats_flow.with_options(task_runner=task_runner(None, workers))(
            str(train),
            str(tmp_path / f"s{workers}"),
            PrepareParams(),
            ComputeParams(workers=workers, window_mb=window),
        )
    for name in ("mean.npy", "pca.json"):
        assert (tmp_path / "s1" / name).read_bytes() == (tmp_path / "s2" / name).read_bytes()

    pixels = np.stack(
        [
            np.asarray(Image.open(io.BytesIO(r.jpeg)).convert("RGB"))
            for shard in sorted(train.glob("*.tar"))
            for r in iter_shard(shard)
        ]
    ).astype(np.float64)
    mean = np.load(tmp_path / "s1" / "mean.npy", allow_pickle=False)
    assert mean.dtype == np.float32 and mean.shape == (256, 256, 3)
    assert np.array_equal(mean, pixels.mean(0).astype(np.float32))
    import json

    pca = json.loads((tmp_path / "s1" / "pca.json").read_text())
    direct = np.cov(pixels.reshape(-1, 3).T, bias=True)
    assert np.allclose(pca["covariance"], direct, rtol=1e-9, atol=0)


def in_process_index(*_):
    raise AssertionError("indexed in the flow's process, not in tasks")


def test_pack_flow_orders_and_worker_invariance(reference, tmp_path, monkeypatch):
    import numpy as np

    import flows.pack
    from alexnet.pack import index_shards, load_chunk
    from alexnet.params import ComputeParams, PackParams
    from alexnet.reader import LmdbSplit
    from flows.pack import pack_flow

    # a shard a task: on 2 workers the index of each split comes from several tasks, which
    # must give the one process's (1 worker) in the same order
    monkeypatch.setattr(flows.pack, "SHARDS_PER_INDEX_TASK", 1)
    prepared = reference[0]
    params = PackParams(batch=5, seed=3)
    for workers in (1, 2):
        if workers == 2:
            monkeypatch.setattr(flows.pack, "index_shards", in_process_index)
        counts = pack_flow.with_options(task_runner=task_runner(None, workers))(
            str(prepared),
            str(tmp_path / f"l{workers}"),
            params,
            PrepareParams(),
            ComputeParams(workers=workers),
        )
        assert counts == {"train": 21, "val": 6}
    for split in ("train", "val"):
        first, second = (tmp_path / f"l{w}" / split / "data.mdb" for w in (1, 2))
        assert first.read_bytes() == second.read_bytes()

    for split, order in (
        ("train", np.random.default_rng(3).permutation(21)),
        ("val", np.arange(6)),
    ):
        source = load_chunk(index_shards(prepared / split), "raw", 256)
        stored = LmdbSplit(tmp_path / "l1" / split)
        images, labels = stored.read_batch(range(len(stored)))
        for position, index in enumerate(order):
            label, payload = source[index]
            assert labels[position] == label
            expected = np.frombuffer(payload, np.uint8).reshape(256, 256, 3)
            assert np.array_equal(images[position].permute(1, 2, 0).numpy(), expected)


def test_a_damaged_shard_stops_packs_index_tasks_with_its_line(reference, tmp_path, monkeypatch):
    import shutil

    import flows.pack
    from alexnet.params import ComputeParams, PackParams

    monkeypatch.setattr(flows.pack, "SHARDS_PER_INDEX_TASK", 1)  # a task a shard
    monkeypatch.setattr(flows.pack, "index_shards", in_process_index)
    prepared = tmp_path / "prepared"
    shutil.copytree(reference[0], prepared)
    shard = prepared / "train" / "shard-00002.tar"
    shard.write_bytes(shard.read_bytes()[:700])  # cut inside its first headers
    with pytest.raises(ShardError, match=r"shard-00002\.tar: not a readable tar \(empty header\)"):
        flows.pack.pack_flow.with_options(task_runner=task_runner(None, 2))(
            str(prepared),
            str(tmp_path / "lmdb"),
            PackParams(),
            PrepareParams(),
            ComputeParams(workers=2),
        )


def test_a_pack_stopped_between_its_splits_leaves_stores_that_are_not_read_together(
    reference, tmp_path, monkeypatch
):
    # pack writes train, then val: one stopped between them (killed, a full disk) left a
    # new train store beside the last run's val, of the same size and classes, and
    # training read the two together without a word.
    import flows.pack as module
    from alexnet.errors import AlexnetError
    from alexnet.lmdb_store import store_version
    from alexnet.params import ComputeParams, PackParams
    from alexnet.reader import LmdbSplit, check_together

    def pack(seed: int) -> list[LmdbSplit]:
        module.pack_flow.with_options(task_runner=task_runner(None, 1))(
            str(reference[0]),
            str(tmp_path / "lmdb"),
            PackParams(batch=5, seed=seed),
            PrepareParams(),
            ComputeParams(workers=1),
        )
        return [LmdbSplit(tmp_path / "lmdb" / split) for split in ("train", "val")]

    train, val = pack(3)
    run = train.meta["pack"]
    assert val.meta["pack"] == run
    check_together(train, val)
    old_val = (tmp_path / "lmdb" / "val" / "data.mdb").read_bytes()

    real = module.write_store

    def full_disk_at_val(path, *args, **kwargs):
        if Path(path).name == "val":
            raise OSError(28, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(module, "write_store", full_disk_at_val)
    with pytest.raises(OSError):
        pack(4)  # another seed: another train order
    monkeypatch.undo()
    train, val = (LmdbSplit(tmp_path / "lmdb" / split) for split in ("train", "val"))
    assert (tmp_path / "lmdb" / "val" / "data.mdb").read_bytes() == old_val
    assert train.meta["pack"] != run and val.meta["pack"] == run
    with pytest.raises(AlexnetError, match="written by different pack runs .*run pack again$"):
        check_together(train, val)
    # (the same run again gives the same digest: the same bytes, as the test above checks)

    # Run again, it writes only what is not this run's: val (train's store is kept).
    written = []
    monkeypatch.setattr(
        module, "write_store", lambda p, *a, **k: written.append(p) or real(p, *a, **k)
    )
    kept = store_version(tmp_path / "lmdb" / "train")
    train, val = pack(4)
    assert [Path(path).name for path in written] == ["val"]
    assert store_version(tmp_path / "lmdb" / "train") == kept
    check_together(train, val)
    # A shard made again since its store was written: that split is written again.
    shard = next((reference[0] / "val").glob("*.tar"))
    os.utime(shard, ns=(time.time_ns(), time.time_ns()))
    written.clear()
    pack(4)
    assert [Path(path).name for path in written] == ["val"]


def records(out: Path) -> list[tuple[str, bytes]]:
    """Every member of every shard, in order: the prepared data, whatever the sharding."""
    import tarfile

    members = []
    for path in sorted(out.rglob("*.tar")):
        with tarfile.open(path) as tar:
            members += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    return members


@pytest.mark.parametrize(("scheduler", "workers"), [(None, 1), ("local", 2)])
def test_files_that_crash_or_hang_the_decoder_cost_only_themselves(
    raw, reference, tmp_path, scheduler, workers
):
    import json
    import shutil

    from tests.decoder_plugin import ABORT, CRASH, HANG

    folder = tmp_path / "raw"
    shutil.copytree(raw, folder)
    classes = sorted(p.name for p in (folder / "train").iterdir())
    (folder / "train" / classes[0] / "crash.JPEG").write_bytes(CRASH + b"...")
    (folder / "train" / classes[1] / "hang.JPEG").write_bytes(HANG + b"...")
    (folder / "val" / classes[2] / "abort.JPEG").write_bytes(ABORT + b"...")
    params = SHARDS.model_copy(update={"plugins": ("tests.decoder_plugin",), "file_timeout": 2})
    out = tmp_path / "prep"
    counts = prepare_flow.with_options(task_runner=task_runner(scheduler, workers))(
        str(folder), str(out), params
    )
    assert counts["files"] == 33 and counts["skipped"] == 3 + 3 and counts["kept"] == 27
    # The same images as a run in which these files never existed, in the same order.
    assert records(out) == records(reference[0])
    skipped = json.loads((out / "report.json").read_text())["skipped_files"]
    reasons = {s["path"].rsplit("/", 1)[1]: s["reason"] for s in skipped}
    assert reasons["crash.JPEG"] == "decoder crashed (SIGSEGV)"
    assert reasons["hang.JPEG"] == f"timed out after 2 s{AGAIN_NEXT_RUN}"
    assert reasons["abort.JPEG"] == "decoder crashed (SIGABRT)"
