"""Flow of the prepare stage: raw images -> 256x256 JPEG tar shards + report.json."""

from __future__ import annotations

from prefect import flow, get_run_logger

from alexnet.atomic import claim_folder, write_json
from alexnet.params import ComputeParams, PrepareParams
from alexnet.prepare import Summary, check_classes, check_skipped, check_splits, plan_shards, refuse
from alexnet.shards import CLASSES_FILE, PREPARE_OWNER, REPORT_FILE, remove_stale
from flows.progress import Bar, in_order
from flows.runners import parallelism
from tasks.prepare import prepare_shard_task

# Shards in flight per worker: enough that a slow shard (a file that hangs until
# params prepare.file_timeout) does not leave the other workers idle.
AHEAD_PER_WORKER = 4


@flow(name="prepare")
def prepare_flow(
    raw: str, out: str, prepare: PrepareParams, compute: ComputeParams = ComputeParams()
) -> dict:
    """Prepare every split of `raw` into `out/<split>/shard-NNNNN.tar`; shards that are
    already complete and current are kept, so a killed run continues where it stopped.
    Shards are planned as the class folders are listed and handed out a few per worker
    ahead, so memory does not grow with the number of files."""
    logger = get_run_logger()
    source = refuse(raw, out)
    target = claim_folder(out, PREPARE_OWNER)  # not a folder of the user's files, nor raw
    # written last, by a run that succeeds: a failed or stopped run leaves none beside
    # its new shards, and pack refuses the folder
    (target / CLASSES_FILE).unlink(missing_ok=True)
    summary = Summary()
    results = in_order(
        plan_shards(source, prepare.shard_size),
        lambda plan: prepare_shard_task.submit(plan, out, prepare),
        AHEAD_PER_WORKER * parallelism(compute.workers),
        Bar("prepare", sum(len(split) for split in source.splits.values()), _files),
    )
    for plan, shard_report in results:
        summary.add(shard_report, plan)
    for split, shards in summary.shards.items():
        remove_stale(target / split, keep=shards)  # shards of an earlier, larger input

    report = summary.counts()
    summary.write(target / REPORT_FILE)  # a failed run's too: its skip reasons
    logger.info(
        "prepared %d files: %d kept, %d converted, %d skipped (%d of %d shards reused)",
        report["files"],
        report["kept"],
        report["converted"],
        report["skipped"],
        summary.reused,
        sum(summary.shards.values()),
    )
    check_skipped(report, prepare.max_skipped, target / REPORT_FILE)
    check_splits(summary.splits, source.root)
    check_classes(summary.usable, source.classes, source.root)
    write_json(target / CLASSES_FILE, [c.__dict__ for c in source.classes])
    return {k: report[k] for k in ("files", "kept", "converted", "skipped")}


def _files(plan) -> int:
    return len(plan.items)


if __name__ == "__main__":
    from flows.stages import main

    main("prepare", prepare_flow)
