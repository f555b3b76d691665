"""The forkserver workers fork from: what it preloads, its workers have without importing."""

from tests.helpers import run_python

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
