"""Flow of the stats stage: mean image and RGB PCA of the prepared training shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger

from alexnet.atomic import folder_target
from alexnet.params import ComputeParams, PrepareParams
from alexnet.shards import shard_files
from alexnet.stats import (
    STATS_OWNER,
    class_count,
    mean_image,
    moments_bytes,
    reduce_moments,
    rgb_pca,
    save_stats,
)
from flows.progress import Bar, in_order
from tasks.stats import shard_moments_task


def refuse(train: str, out: str, **_: object) -> None:
    """What stops a run before any work, as one line: the stage command calls it before
    Prefect's server starts (flows.stages.run_stage), the flow first."""
    folder_target(out, STATS_OWNER)  # a folder it may not replace
    shard_files(train)
    class_count(train)


@flow(name="stats")
def stats_flow(train: str, out: str, prepare: PrepareParams, compute: ComputeParams) -> dict:
    """Map over the shards, reduce in shard order (holding at most params
    `compute.window_mb` of shard moments), write mean.npy and pca.json into `out`,
    replaced whole."""
    refuse(train, out)
    shards = shard_files(train)
    classes = class_count(train)  # the labels are checked, though stats does not use them

    results = in_order(
        shards,
        lambda shard: shard_moments_task.submit(str(shard), prepare.size, classes),
        compute.window_mb << 20,
        Bar("stats", len(shards)),
        size=lambda shard: moments_bytes(prepare.size),
    )
    moments = reduce_moments((part for _, part in results), train)
    pca = rgb_pca(moments)
    save_stats(Path(out), mean_image(moments), pca)
    get_run_logger().info(
        "stats of %d images: RGB mean %s, eigenvalues %s",
        pca["images"],
        np.round(pca["rgb_mean"], 2).tolist(),
        np.round(pca["eigenvalues"], 1).tolist(),
    )
    return {"images": pca["images"], "eigenvalues": pca["eigenvalues"]}


if __name__ == "__main__":
    from flows.stages import main

    main("stats", stats_flow)
