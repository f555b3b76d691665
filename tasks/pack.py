"""Prefect task of the pack stage: read (and for `raw`, decode) one chunk of records."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from alexnet.pack import Entry, load_chunk
from tasks.quiet import quiet_user_errors


@task(name="load-chunk", cache_policy=NO_CACHE)
@quiet_user_errors
def load_chunk_task(chunk: list[Entry], encoding: str, size: int) -> list[tuple[int, bytes]]:
    return load_chunk(chunk, encoding, size)
