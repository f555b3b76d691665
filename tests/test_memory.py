"""Memory that stays flat whatever the data (issue 15): the LMDB writer, and the pack flow
whose workers send every record back, run on n and 4n records of ~200 KB, and the stats
flow on n and 4n shards (each one's moments 1.5 MB); the growth of the main process's
peak anonymous memory must stay under a quarter of the extra data. (It grew by ~1.4
bytes per byte written when Prefect's finished futures kept their results.)"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import pytest

from bench.memory import run_sampled
from tests.helpers import CLASSES, REPO, in_fresh_process, jpeg

RECORD = 256 * 256 * 3  # bytes of a raw record: ~200 KB


def writer_peak(tmp_path, count: int) -> int:
    code = f"""
import numpy as np
from alexnet.lmdb_store import write_store
rng = np.random.default_rng(0)
def batches():
    for start in range(0, {count}, 8):  # fresh records, as the pack flow's chunks arrive
        yield [(i % 2, rng.bytes({RECORD})) for i in range(start, min(start + 8, {count}))]
print(write_store({str(tmp_path / f"store{count}")!r}, batches(), "raw", {CLASSES!r}, size=256))
"""
    result = run_sampled([sys.executable, "-c", code], cwd=REPO)
    assert result.returncode == 0 and result.output.split()[-1] == str(count), result.output
    return result.main_peak


def test_the_store_writers_memory_does_not_grow_with_the_records(tmp_path):
    n = 64
    growth = writer_peak(tmp_path, 4 * n) - writer_peak(tmp_path, n)
    assert growth < 3 * n * RECORD / 4, f"+{growth >> 20} MB for {3 * n * RECORD >> 20} MB more"


def prepared(root, count: int, per_shard: int = 32):
    """A prepared folder: `count` train and 4 val 256x256 JPEGs of two classes."""
    from alexnet.shards import Record, write_shard

    images = [jpeg(256, 256, seed=i % 8) for i in range(8)]  # few distinct: fast to make
    for split, total in (("train", count), ("val", 4)):
        folder = root / split
        folder.mkdir(parents=True)
        for shard, start in enumerate(range(0, total, per_shard)):
            records = [
                Record(f"{split}/{i:05d}", images[i % 8], i % 2)
                for i in range(start, min(start + per_shard, total))
            ]
            write_shard(folder / f"shard-{shard:05d}.tar", records, {})
    (root / "classes.json").write_text(json.dumps(CLASSES))
    return root


def pack_peak(tmp_path, count: int, api_url: str) -> int:
    root = tmp_path / f"n{count}"
    params = tmp_path / "params.yaml"
    # batches of 16: Prefect keeps a little of each task run (~0.1 MB), which at batches
    # of 8 put the growth within a few MB of the bound (it failed once in a whole-suite run)
    params.write_text("pack:\n  batch: 16\ncompute:\n  workers: 2\n  window_mb: 4\n")
    command = [sys.executable, "-m", "flows.pack", str(prepared(root / "prepared", count))]
    command += [str(root / "lmdb"), "--params", str(params)]
    env = {**os.environ, "PREFECT_API_URL": api_url}
    result = run_sampled(command, cwd=REPO, env=env)
    assert result.returncode == 0, result.output[-3000:]
    assert f"{count} train and 4 val records" in result.output
    return result.main_peak


def test_the_pack_flows_memory_does_not_grow_with_the_records(tmp_path, prefect_server):
    n = 64
    growth = pack_peak(tmp_path, 4 * n, prefect_server) - pack_peak(tmp_path, n, prefect_server)
    assert growth < 3 * n * RECORD / 4, f"+{growth >> 20} MB for {3 * n * RECORD >> 20} MB more"


MOMENTS = 256 * 256 * 3 * 8  # bytes of a shard's moments: its float64 image sum


def stats_peak(tmp_path, shards: int, api_url: str) -> int:
    """The stats flow's main-process peak over `shards` shards of one image each."""
    root = tmp_path / f"n{shards}"
    params = tmp_path / "params.yaml"
    params.write_text("compute:\n  workers: 2\n  window_mb: 4\n")
    train = prepared(root / "prepared", shards, per_shard=1) / "train"
    command = [sys.executable, "-m", "flows.stats", str(train), str(root / "stats")]
    env = {**os.environ, "PREFECT_API_URL": api_url}
    result = run_sampled([*command, "--params", str(params)], cwd=REPO, env=env)
    assert result.returncode == 0 and f"stats: {shards} images" in result.output, result.output
    return result.main_peak


def test_the_stats_flows_memory_does_not_grow_with_the_shards(tmp_path, prefect_server):
    # each shard's moments are 1.5 MB whatever its images: ImageNet's 1,282 train shards
    # would be 1.9 GB, held at once without the window
    n = 8
    growth = stats_peak(tmp_path, 4 * n, prefect_server) - stats_peak(tmp_path, n, prefect_server)
    assert growth < 3 * n * MOMENTS / 4, f"+{growth >> 20} MB for {3 * n * MOMENTS >> 20} MB more"


class Done:  # a finished future
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def run_in_order(sizes: list[int], window: int, monkeypatch) -> tuple[list, list, list]:
    """Consume `in_order` over works of `sizes`, checking at each submission that the
    works submitted and not yet freed (consumed, then collected) stay within `window`
    (the next to consume excepted); returns (taken, consumed, collections: how many
    had been consumed at each collection)."""
    import gc

    from flows.progress import Bar, in_order

    taken, submitted, consumed, collections = [], [], [], []
    collect = gc.collect

    def collected():
        collections.append(len(consumed))
        return collect()

    monkeypatch.setattr(gc, "collect", collected)

    def works():  # a generator: only what the window admits is taken from it
        for index in range(len(sizes)):
            taken.append(index)
            yield index

    def submit(index):
        submitted.append(index)
        freed = collections[-1] if collections else 0
        held = sum(sizes[i] for i in submitted[freed:])
        assert held <= window or submitted[-1] == len(consumed), (submitted, consumed)
        return Done(index * 10)

    bar = Bar("test", len(sizes))
    for work, result in in_order(works(), submit, window, bar, sizes.__getitem__):
        assert result == work * 10 and len(taken) <= len(submitted) + 1
        consumed.append(work)
    assert consumed == list(range(len(sizes))) and submitted == consumed
    return taken, consumed, collections


def test_in_order_yields_in_order_and_holds_at_most_the_window(monkeypatch):
    # 9 > the window: submitted alone, when its turn comes
    run_in_order([3, 5, 2, 9, 1, 1, 4], 8, monkeypatch)


def test_in_order_collects_once_a_quarter_of_the_window_is_released(monkeypatch):
    # works of 1 in a window of 8: a collection every 2 (each walks Prefect's buffered
    # events, so not after every result), and one at the end
    *_, collections = run_in_order([1] * 20, 8, monkeypatch)
    assert collections == list(range(2, 21, 2))
    # a work of a quarter of the window or more: a collection after each
    *_, collections = run_in_order([2, 5, 3, 2], 8, monkeypatch)
    assert collections == [1, 2, 3, 4]


def plan_peak(root, classes: int) -> int:
    """tracemalloc's peak while prepare's plans of `classes` folders of 50 files are taken
    one by one, as the flow takes them (run `in_fresh_process`)."""
    import tracemalloc

    from alexnet.prepare import plan_shards
    from alexnet.sources import open_source

    for split, count in (("train", classes), ("val", 1)):
        for wnid in range(count):
            folder = root / split / f"n{wnid:08d}"
            folder.mkdir(parents=True)
            for i in range(50):
                (folder / f"n{wnid:08d}_{i}.JPEG").touch()
    tracemalloc.start()
    try:
        for plan in plan_shards(open_source(root), shard_size=20):
            del plan
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_prepares_plan_does_not_grow_with_the_files(tmp_path):
    # Holding the whole plan took ~1 KB a file (the listing and the items): 3,000 more
    # files would add ~3 MB. Now one folder's samples and one shard's items are held.
    n = 20
    small = in_fresh_process(plan_peak, tmp_path / "small", n)
    large = in_fresh_process(plan_peak, tmp_path / "large", 4 * n)
    assert large - small < 3 * n * 50 * 50, f"{small} -> {large} bytes"


def index_held(folder) -> tuple[int, int, int]:
    """The bytes pack's index of 2,000 records holds (tracemalloc, run `in_fresh_process`),
    with its length and its last record's label."""
    import gc
    import tracemalloc

    from alexnet.pack import index_shards
    from alexnet.shards import Record, write_shard

    for shard in range(4):
        records = [Record(f"n0/img_{shard}_{i}", b"\xff\xd8\xff", i % 2) for i in range(500)]
        write_shard(folder / f"shard-{shard:05d}.tar", records, {})
    index_shards(folder, classes=2)  # tarfile's and numpy's first-use caches, once
    tracemalloc.start()
    try:
        index = index_shards(folder, classes=2)
        gc.collect()  # what is held, not cyclic garbage (tarfile's) waiting for a collection
        return tracemalloc.get_traced_memory()[0], len(index), int(index[-1].label)
    finally:
        tracemalloc.stop()


def test_packs_index_takes_a_few_bytes_a_record(tmp_path):
    # A list of Entry objects took ~300 bytes a record: ~0.4 GB for ImageNet's 1.28M.
    held, length, last = in_fresh_process(index_held, tmp_path)
    assert length == 2000 and last == 1
    assert held < 2000 * 40, f"{held / 2000:.0f} bytes a record"


class Running:  # a task that never ends, as a runner's Prefect future wraps it
    def __init__(self):
        import concurrent.futures

        self.wrapped_future, self.task_run_id, self.waits = concurrent.futures.Future(), 1, 0
        self.wrapped_future.set_running_or_notify_cancel()  # running: `settle` cannot cancel

    def wait(self, timeout=None):
        self.waits += 1
        time.sleep(min(timeout or 0, 0.01))


def test_a_ctrl_c_python_dropped_still_stops_the_wait_for_a_task(monkeypatch):
    # One arriving while a weakref callback runs is printed ("Exception ignored in ...")
    # and lost: the stage ran on to its end, exit 0 (CI, the Ctrl-C test, "pool-starting").
    # The handler has noted it, and the waits read that.
    from flows import progress
    from tasks.quiet import INTERRUPTED

    running = Running()
    try:
        for wait in (
            lambda: progress.result(running),
            lambda: progress.gather([running], "synth", [1]),
            lambda: list(progress.in_order([0], lambda work: running, 1, progress.Bar("x", 1))),
        ):
            INTERRUPTED.set()
            with pytest.raises(KeyboardInterrupt):  # (then `settle` waits for the task,
                wait()  # as after any Ctrl-C: here it ends at once)
            INTERRUPTED.clear()
        # not interrupted: the wait goes on, a little at a time
        monkeypatch.setattr(progress, "POLL_S", 0.01)
        finisher = threading.Timer(0.2, running.wrapped_future.set_result, [None])
        running.result = lambda: None
        running.waits = 0
        finisher.start()
        progress.result(running)  # returns once the task ends
        assert running.waits >= 2
    finally:
        INTERRUPTED.clear()


def test_a_dropped_ctrl_c_prints_no_traceback(monkeypatch, capsys):
    # Python reports the KeyboardInterrupt it drops ("Exception ignored in ...", and its
    # traceback) on stderr: the stage's Ctrl-C is one line, `INTERRUPTED` does the rest.
    import sys
    import weakref

    from tasks import quiet

    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    monkeypatch.setattr(quiet.signal, "signal", lambda *args: None)  # this process's kept
    quiet.note_interrupts()

    class Thing:
        pass

    def dropped(thing: Thing) -> None:
        thing = Thing()
        weakref.finalize(thing, lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
        del thing

    try:
        quiet.INTERRUPTED.set()
        dropped(Thing())
        assert "KeyboardInterrupt" not in capsys.readouterr().err
        quiet.INTERRUPTED.clear()  # any other time: reported as Python does
        dropped(Thing())
        assert "KeyboardInterrupt" in capsys.readouterr().err
    finally:
        quiet.INTERRUPTED.clear()
