"""Prefect flows, one per stage, and the pipeline; logic lives in `alexnet`."""

import alexnet  # noqa: F401  (first: it sets torch's allocator hint before torch loads)
