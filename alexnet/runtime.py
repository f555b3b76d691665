"""The process set-up every entry point calls once, first: `configure()`.

Nothing here runs on import. The values are hints (a user's own environment wins) that
torch and MKL read lazily, at the first allocation and the first MKL call:
- torch's CPU allocator backs large tensors (activations, the 244 MB of fc gradients
  made each step) with 2 MB transparent huge pages instead of faulting in 4 KB pages on
  every allocation: ~1.3x faster CPU training steps (bench/model.py);
- MKL (the fc layers' and the LRN's GEMMs) keeps the thread count it is given and one
  code path per CPU, so deterministic runs repeat bit for bit: by default it may use
  fewer threads (another summation order) when it judges it better.
It also makes Pillow refuse truncated files (its default, which a host program may have
changed): a truncated image must be skipped, never grey-padded.
"""

from __future__ import annotations

import os

HINTS = {"THP_MEM_ALLOC_ENABLE": "1", "MKL_DYNAMIC": "FALSE", "MKL_CBWR": "AUTO"}


def configure() -> None:
    """Set the environment hints of this module (keeping any value already set)."""
    from PIL import ImageFile

    for name, value in HINTS.items():
        os.environ.setdefault(name, value)
    ImageFile.LOAD_TRUNCATED_IMAGES = False
