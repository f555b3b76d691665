"""Flows for the Prefect UI and schedules: each goes through `dvc repro`, so a run from
the UI and a `dvc repro` at the terminal never disagree (alexnet/repro.py).

- `stage`: one stage of the chain (and whatever it needs that changed);
- `pipeline`: the whole chain, or up to one stage;
- `retrain`: the pipeline on a schedule; with no new data it does nothing, quickly.
Each publishes the metrics (and what changed since the run before) as an artifact.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from alexnet.repro import Stage, metrics, metrics_diff, repro, status_clean


def _run(repo: str, target: str | None, force: bool, key: str) -> dict:
    logger = get_run_logger()
    root = Path(repo).resolve()
    before = metrics(root)
    ran = repro(root, target, force, logger.info)
    after = metrics(root)
    changes = metrics_diff(before, after)
    if ran:
        logger.info("stages run: %s", ", ".join(ran))
    else:
        logger.info("nothing changed: data and pipelines are up to date")
    rows = [row for row in changes if row["change"] != 0] or changes
    if rows:
        create_table_artifact(
            rows,
            key=f"{key}-metrics",
            description="DVC metrics: old = the run before, new = this run",
        )
    summary = "\n".join(
        [
            f"# {key}",
            "",
            f"Stages run: {', '.join(ran) or 'none (up to date)'}",
            "",
            f"`dvc status` clean: {status_clean(root)}",
        ]
    )
    create_markdown_artifact(summary, key=f"{key}-run", description="What dvc repro did")
    return {"ran": ran, "metrics": after}


@flow(name="stage")
def stage_flow(stage: Stage = "train", force: bool = False, repo: str = ".") -> dict:
    """`dvc repro <stage>`: the stage, after whatever it depends on that changed.
    `force` re-runs the stage even when nothing changed."""
    return _run(repo, stage, force, f"stage-{stage}")


@flow(name="pipeline")
def pipeline_flow(until: Stage | None = None, force: bool = False, repo: str = ".") -> dict:
    """`dvc repro`: the whole chain (or up to `until`), re-running only what changed."""
    return _run(repo, until, force, "pipeline")


@flow(name="retrain")
def retrain_flow(repo: str = ".") -> dict:
    """The scheduled retraining: `dvc repro`. New images in the raw folder re-run the
    chain from prepare; with nothing new it finishes at once. The artifact compares the
    metrics with the run before."""
    return _run(repo, None, False, "retrain")
