"""Prefect task of the synth stage: draw one chunk of the demo dataset."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from alexnet.synth import Job, run_job
from tasks.quiet import quiet_user_errors


@task(name="synth-images", cache_policy=NO_CACHE)
@quiet_user_errors
def synth_images(
    job: Job, root: str, seed: int, min_side: int, max_side: int, quality: int, clutter: int
) -> int:
    return run_job(job, Path(root), seed, min_side, max_side, quality, clutter)
