"""Prefect task of the prepare stage: make (or reuse) one shard."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from alexnet.params import PrepareParams
from alexnet.prepare import ShardPlan, ShardReport, prepare_shard
from tasks.quiet import quiet_user_errors


# No result cache: under DVC the outputs are deleted before a stage runs, so a cached
# task that skipped writing its file would break the stage. Reuse is by fingerprint.
@task(name="prepare-shard", cache_policy=NO_CACHE, retries=1)
@quiet_user_errors
def prepare_shard_task(plan: ShardPlan, out: str, prepare: PrepareParams) -> ShardReport:
    return prepare_shard(plan, out, prepare)
