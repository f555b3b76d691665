"""alexnet-pipeline: the AlexNet paper's system as a reproducible workflow."""

import os

# Before torch is imported: torch's CPU allocator then backs large tensors (activations,
# the 244 MB of fc gradients made each step) with 2 MB transparent huge pages instead of
# faulting in 4 KB pages on every allocation: ~1.3x faster CPU training steps here
# (bench/model.py). Only a hint to the kernel; results are unchanged.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
