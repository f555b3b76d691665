"""Flow of the stats stage: mean image and RGB PCA of the prepared training shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger

from alexnet.params import ComputeParams, PrepareParams
from alexnet.shards import shard_files
from alexnet.stats import (
    class_count,
    mean_image,
    moments_bytes,
    reduce_moments,
    refuse,
    rgb_pca,
    save_stats,
)
from flows.progress import Bar, in_order
from tasks.stats import shard_moments_task


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
