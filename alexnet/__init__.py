"""alexnet-pipeline: the AlexNet paper's system as a reproducible workflow."""

import os

# Set before torch is imported (they are read once, when torch and MKL load):
# - torch's CPU allocator backs large tensors (activations, the 244 MB of fc gradients
#   made each step) with 2 MB transparent huge pages instead of faulting in 4 KB pages
#   on every allocation: ~1.3x faster CPU training steps here (bench/model.py);
# - MKL (the fc layers' and the LRN's GEMMs) keeps the thread count it is given and
#   one code path per CPU, so `train.deterministic` runs repeat bit for bit: by default
#   it may use fewer threads (another summation order) when it judges it better.
# Hints only; a user's own values win.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("MKL_CBWR", "AUTO")
