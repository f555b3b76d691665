"""The process set-up every entry point calls once, first: `configure()`.

Nothing here runs on import. The values are hints (a user's own environment wins) that
MKL reads lazily, at its first call: MKL (the fc layers' and the LRN's GEMMs) keeps the
thread count it is given and one code path per CPU, so deterministic runs repeat bit for
bit: by default it may use fewer threads (another summation order) when it judges it
better.
torch's 2 MB huge pages for large CPU tensors (`THP_MEM_ALLOC_ENABLE=1`) were a hint here
until they were measured on whole stages: faster steps, but more of the kernel's time
(in train, 204-263 s against 143-152 s), and the demo's train and evaluate stages ran
1.1-1.3x slower with them (BENCHMARKS.md, "Huge pages"). torch's default stands.
It also makes Pillow refuse truncated files (its default, which a host program may have
changed): a truncated image must be skipped, never grey-padded. And `cores()` says how
many cores this process may use.
"""

from __future__ import annotations

import os

HINTS = {"MKL_DYNAMIC": "FALSE", "MKL_CBWR": "AUTO"}


def configure() -> None:
    """Set the environment hints of this module (keeping any value already set)."""
    from PIL import ImageFile

    for name, value in HINTS.items():
        os.environ.setdefault(name, value)
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def cores() -> int:
    """The cores this process may run on: its affinity (a container's or a batch job's
    CPU set), where `os.cpu_count()` says the whole host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1
