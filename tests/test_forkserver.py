"""The forkserver workers fork from: what it preloads, its workers have without importing;
the signals it was started to ignore, they ignore."""

import os
import signal
import subprocess
import sys

from tests.helpers import REPO, run_python

WORKERS = """
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from alexnet.forkserver import forkserver
from tests.imported import by
for context in (forkserver("tests.imported"), multiprocessing.get_context("spawn")):
    with ProcessPoolExecutor(2, mp_context=context) as pool:
        pids = [pool.submit(by).result() for _ in range(2)]
    print(*(importer != worker for importer, worker in pids))
"""


def test_the_servers_workers_have_its_modules_imported_once_by_it():
    # By spawn, each worker imports the module itself; forked from the forkserver, the
    # module is the one the server imported before it forked them.
    done = run_python(WORKERS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:2] == ["True True", "False False"]


STOPPED = """
import signal, time
import torch
from alexnet.reader import batch_loader

stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(True))  # as the trainer: a flag
data = torch.utils.data.TensorDataset(torch.arange(400))
batches = iter(batch_loader(data, range(400), workers=2))
next(batches), next(batches)  # one from each worker: both have started
print("ready", flush=True)
while not stop:
    time.sleep(0.01)
time.sleep(0.5)  # (workers the signal killed would be gone by now)
print("read", sum(1 for _ in zip(range(50), batches)), flush=True)
"""


def test_loader_workers_read_on_after_a_sigterm_to_the_group():
    # torchrun stops its workers with SIGTERM to each one's process group; the trainer
    # reads on to its next loss read and saves there. The loader's workers died of it:
    # the next batches they had not read ahead failed ("DataLoader worker exited
    # unexpectedly"), and no checkpoint was saved.
    process = subprocess.Popen(
        [sys.executable, "-c", STOPPED],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline() == "ready\n", process.stderr.read()[-3000:]
        os.killpg(process.pid, signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
        process.wait()
    assert (process.returncode, out) == (0, "read 50\n"), err[-3000:]
