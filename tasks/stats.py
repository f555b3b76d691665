"""Prefect task of the stats stage: the sufficient statistics of one shard."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from alexnet.stats import Moments, shard_moments
from tasks.quiet import quiet_user_errors


@task(name="shard-moments", cache_policy=NO_CACHE)
@quiet_user_errors
def shard_moments_task(shard: str, size: int, classes: int | None = None) -> Moments:
    return shard_moments(shard, size, classes)
