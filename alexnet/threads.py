"""Running a numba kernel over slices of a batch on torch's threads.

The kernels (`alexnet.lrn_cpu`, `alexnet.augment_cpu`) release the GIL and take a row
range `first, last`; this splits the rows into one slice per torch thread, so they use
the cores `torch.set_num_threads` gives the rest of the step. Deterministic: each row is
computed by one call whatever the split.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise

import torch

from alexnet import runtime

_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def share_of_cores(processes: int) -> int:
    """Threads for each of `processes` processes sharing this node's cores (at least 1);
    under torchrun, its ranks on this node (LOCAL_WORLD_SIZE) share them too."""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, runtime.cores() // (max(1, processes) * max(1, ranks)))


def run_split(kernel: Callable, rows: int, arrays: Sequence, options: Sequence = ()) -> None:
    """kernel(*arrays, first, last, *options) for slices [first, last) covering rows."""
    threads = min(torch.get_num_threads(), rows)
    if threads <= 1:
        kernel(*arrays, 0, rows, *options)
        return
    key = (os.getpid(), threads)  # a forked DataLoader worker makes its own pool
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="kernel")
    bounds = [rows * i // threads for i in range(threads + 1)]
    futures = [
        _POOLS[key].submit(kernel, *arrays, first, last, *options)
        for first, last in pairwise(bounds)
    ]
    for future in futures:
        future.result()
