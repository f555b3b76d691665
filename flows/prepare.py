"""Flow of the prepare stage: raw images -> 256x256 JPEG tar shards + report.json."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from alexnet.atomic import write_json
from alexnet.params import PrepareParams
from alexnet.prepare import check_classes, check_skipped, plan_shards, summarize
from alexnet.shards import remove_stale
from alexnet.sources import open_source
from flows.progress import gather
from tasks.prepare import prepare_shard_task


@flow(name="prepare")
def prepare_flow(raw: str, out: str, prepare: PrepareParams) -> dict:
    """Prepare every split of `raw` into `out/<split>/shard-NNNNN.tar`; shards that are
    already complete and current are kept, so a killed run continues where it stopped."""
    logger = get_run_logger()
    source = open_source(raw)
    plans = plan_shards(source, prepare.shard_size)
    splits, classes, root = list(source.splits), source.classes, source.root
    del source  # its samples, ~0.5 KB a file: the plans hold what the shards need
    target = Path(out)
    for split in splits:
        (target / split).mkdir(parents=True, exist_ok=True)
        remove_stale(target / split, keep=sum(plan.split == split for plan in plans))
    futures = [prepare_shard_task.submit(plan, out, prepare) for plan in plans]
    reports = gather(futures, "prepare", [len(plan.items) for plan in plans])

    report = summarize(reports)
    write_json(target / "classes.json", [c.__dict__ for c in classes])
    write_json(target / "report.json", report)
    reused = sum(r.reused for r in reports)
    logger.info(
        "prepared %d files: %d kept, %d converted, %d skipped (%d of %d shards reused)",
        report["files"],
        report["kept"],
        report["converted"],
        report["skipped"],
        reused,
        len(reports),
    )
    check_skipped(report, prepare.max_skipped, target / "report.json")
    check_classes(plans, report, classes, root)
    return {k: report[k] for k in ("files", "kept", "converted", "skipped")}


if __name__ == "__main__":
    from flows.stages import main

    main("prepare", prepare_flow)
