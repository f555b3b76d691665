"""Flows for the Prefect UI, workers and schedules: each goes through `dvc repro`, so a
run from the UI and a `dvc repro` at the terminal never disagree (alexnet/repro.py).

- `stage` (one flow per stage, all named "stage"): one stage of the chain, after
  whatever it needs that changed; `force` re-runs that stage even if unchanged;
- `pipeline`: the whole chain, or up to one stage; `force` re-runs all of it;
- `retrain`: the pipeline on a schedule; with no new data it does nothing, quickly, and a
  run that starts too late (after downtime) is skipped rather than stacked.

Each runs the chain as one task per stage (`dvc repro --single-item`), the stage's own
flow run a child of its task. Runs on one repository take turns (a Prefect global
concurrency limit of 1 per repository: DVC locks the repository, so a second `dvc
repro` would fail), and each successful run pushes what it produced to the DVC remote.
Each publishes the metrics (and what changed since the run before) as an artifact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

from prefect import Flow, flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.context import TaskRunContext
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.runtime import flow_run
from prefect.settings import PREFECT_CLIENT_RETRY_EXTRA_CODES, temporary_settings
from prefect.states import Completed, State

from alexnet.params import DEFAULT_FILE, load_params
from alexnet.repro import (
    RESTORED,
    STAGES,
    Stage,
    chain,
    check_remote_kept,
    default_remote,
    goes_with_the_run,
    metrics,
    metrics_diff,
    push_outputs,
    remote_url,
    repository_key,
    repository_limit,
    repro,
    status_clean,
)
from flows.stages import PLANNED_RUN
from flows.stages import STAGES as STAGE_TABLE


@contextmanager
def one_run_at_a_time(repo: Path) -> Iterator[None]:
    """Hold the repository's slot (created on first use, limit 1) while the body runs;
    a second run waits here, in the Running state, until the first lets go."""
    key = repository_key(repo)
    name = repository_limit(key)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=1)
                )
            except ObjectAlreadyExists:  # another run created it first
                pass
    get_run_logger().info(
        "taking the turn of %s (concurrency limit %s; a run holding it goes first)", key, name
    )
    # strict: the limit must be there (made above), or the runs would not take turns.
    # A lease renewal that fails (an API outage, a server restart) only warns, in
    # Prefect's own line: strict alone would also cancel the run, hours into a train.
    with concurrency(name, occupy=1, strict=True, raise_on_lease_renewal_failure=False):
        yield


@task(name="dvc-repro", task_run_name="{stage}", cache_policy=NO_CACHE)
def repro_stage(stage: str, repo: str, force: bool, pull: bool) -> State:
    """`dvc repro --single-item <stage>`, the previous stages being done. The stage's own
    flow run is created here, as a child of this task, and handed to the stage command
    (PLANNED_RUN), so its logs, progress and artifacts are one click from the pipeline's
    run; the task ends as "Ran", "Restored" (from the run cache) or "Up to date"."""
    logger = get_run_logger()
    planned = _plan_stage_run(stage)
    restored = False

    def log(line: str) -> None:
        nonlocal restored
        restored |= RESTORED.search(line) is not None
        logger.info(line)

    try:
        env = {PLANNED_RUN: planned} if planned else {}
        ran = repro(Path(repo), stage, force, log, single=True, pull=pull, env=env)
    finally:
        if planned:
            _drop_if_unused(planned)
    if ran:
        return Completed(name="Ran", message=f"{stage} ran")
    if restored:
        return Completed(name="Restored", message=f"{stage} restored from the run cache")
    return Completed(name="Up to date", message=f"{stage} was up to date")


def _plan_stage_run(stage: str) -> str | None:
    """A flow run of the stage's flow, child of the running task, for its command to run
    (none for a stage of dvc.yaml that is not one of the pipeline's own)."""
    if stage not in STAGE_TABLE:
        return None
    parent = TaskRunContext.get().task_run.id
    # Prefect records a task run from its events, after a delay: until it has, a child
    # naming it is refused (409, a foreign key). The client's own retries wait it out.
    with (
        temporary_settings({PREFECT_CLIENT_RETRY_EXTRA_CODES: {409}}),
        get_client(sync_client=True) as client,
    ):
        run = client.create_flow_run(STAGE_TABLE[stage].flow(), parent_task_run_id=parent)
    return str(run.id)


def _drop_if_unused(flow_run_id: str) -> None:
    """Delete the planned run when DVC did not run the stage (it never left Pending)."""
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(flow_run_id))
        if run.state is None or run.state.is_pending() or run.state.is_scheduled():
            client.delete_flow_run(run.id)


def _run(
    repo: str,
    until: str | None,
    force: str,
    key: str,
    push: bool,
    late_after: timedelta | None = None,
) -> dict:
    """The chain up to `until` (alexnet.repro.chain), a task per stage, each waiting for
    the one before; `force`: "none", "last" (the stage `until`) or "all". With
    `late_after`, a run whose turn comes later than that after its scheduled time does
    nothing (it was down, or behind a long run): missed schedules do not pile up."""
    logger = get_run_logger()
    root = Path(repo).resolve()
    stages = chain(root, until)
    forced = {"none": set(), "last": set(stages[-1:]), "all": set(stages)}[force]
    with one_run_at_a_time(root):
        late = lateness(flow_run.scheduled_start_time)
        if late_after is not None and late > late_after:
            logger.warning("skipped: its turn came %s after its scheduled time", late)
            return {"ran": [], "metrics": {}, "pushed": False, "skipped": True}
        before = metrics(root)
        remote = default_remote(root)
        if push and remote:
            check_remote_kept(root, remote, remote_url(root, remote))
        if "train" in stages:
            _warn_if_checkpoint_goes(root, logger.warning)
        ran = []
        for stage in stages:
            # Called, not submitted: the task runs in this, the main, thread, where
            # Prefect turns a cancellation's SIGTERM into an exception, and `repro`
            # stops dvc's process tree on it. (A submitted task's thread is never told:
            # the run let go of the turn while its stage ran on, orphaned.)
            state = repro_stage(
                stage, str(root), stage in forced, remote is not None, return_state=True
            )
            if not state.is_completed():
                state.result()  # raises the stage's error (failed, crashed or cancelled)
            if state.name == "Ran":
                ran.append(stage)
        after = metrics(root)
        pushed = push and push_outputs(root, remote, logger.info)
        # Still this run's turn: `dvc status` takes DVC's lock, as the next run's repro does.
        _publish(key, metrics_diff(before, after), ran, status_clean(root), pushed)
    if ran:
        logger.info("stages run: %s", ", ".join(ran))
    else:
        logger.info("nothing changed: data and pipelines are up to date")
    return {"ran": ran, "metrics": after, "pushed": pushed}


def _warn_if_checkpoint_goes(root: Path, warn: Callable[[str], None]) -> None:
    """Say so when the train stage's checkpoint is inside a Prefect worker's temporary
    clone: a cancelled run's training would start afresh on the next run."""
    arg = STAGE_TABLE["train"].path("checkpoint")
    checkpoint = Path(arg.from_environment() or arg.default)
    if scratch := goes_with_the_run(root, checkpoint):
        warn(
            f"train's checkpoint {root / checkpoint} goes with this run's temporary folder "
            f"{scratch}: a cancelled training starts afresh next run; set {arg.envvar} on "
            'the workers to a path outside it (README, "More machines")'
        )


def _publish(key: str, changes: list[dict], ran: list[str], clean: bool, pushed: bool) -> None:
    """The run's artifacts: the metrics that changed, and what `dvc repro` did."""
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
            f"`dvc status` clean: {clean}",
            "",
            f"Pushed to the DVC remote: {'yes' if pushed else 'no'}",
        ]
    )
    create_markdown_artifact(summary, key=f"{key}-run", description="What dvc repro did")


def _stage_flow(stage: str) -> Flow:
    """The flow of one stage's deployment: its form has no stage to change."""

    def run(force: bool = False, push: bool = True, repo: str = ".") -> dict:
        return _run(repo, stage, "last" if force else "none", f"stage-{stage}", push)

    run.__name__ = run.__qualname__ = f"{stage}_stage"
    run.__doc__ = f"""`dvc repro {stage}`: the stage, after whatever it depends on that changed.

    Args:
        force: re-run {stage} even when nothing changed (the stages before it run
            only if they changed, as without force).
        push: push the outputs and the run cache to the DVC remote after a success.
        repo: the repository (a folder on the worker) to run `dvc repro` in.
    """
    return flow(name="stage")(run)


# One module-level flow per stage: the deployments' entrypoints (prefect.yaml).
synth_stage = _stage_flow("synth")
prepare_stage = _stage_flow("prepare")
stats_stage = _stage_flow("stats")
pack_stage = _stage_flow("pack")
train_stage = _stage_flow("train")
evaluate_stage = _stage_flow("evaluate")
STAGE_FLOWS: dict[str, Flow] = {stage: globals()[f"{stage}_stage"] for stage in STAGES}


@flow(name="pipeline")
def pipeline_flow(
    until: Stage | None = None, force: bool = False, push: bool = True, repo: str = "."
) -> dict:
    """`dvc repro`: the whole chain (or up to `until`), re-running only what changed.

    Args:
        until: the last stage to run (empty: the whole chain, up to evaluate).
        force: re-run every stage of the chain up to `until`, changed or not (on
            ImageNet: hours of training). To re-run one stage, use its own deployment.
        push: push the outputs and the run cache to the DVC remote after a success.
        repo: the repository (a folder on the worker) to run `dvc repro` in.
    """
    return _run(repo, until, "all" if force else "none", "pipeline", push)


@flow(name="retrain")
def retrain_flow(
    late_after_minutes: float | None = None, push: bool = True, repo: str = "."
) -> dict:
    """The scheduled retraining: `dvc repro`. New images in the raw folder re-run the
    chain from prepare; with nothing new it finishes at once. The artifact compares the
    metrics with the run before.

    Args:
        late_after_minutes: skip the run when its turn comes this many minutes after
            its scheduled time (after downtime, or behind a long run), instead of
            stacking (empty: params.yaml's serve.late_after_minutes).
        push: push the outputs and the run cache to the DVC remote after a success.
        repo: the repository (a folder on the worker) to run `dvc repro` in.
    """
    if late_after_minutes is None:
        late_after_minutes = load_params(Path(repo) / DEFAULT_FILE).serve.late_after_minutes
    return _run(repo, None, "none", "retrain", push, timedelta(minutes=late_after_minutes))


def lateness(scheduled: datetime | None, now: datetime | None = None) -> timedelta:
    """How long after `scheduled` a run starts (a run started by hand is scheduled for
    when it was created)."""
    if scheduled is None:
        return timedelta(0)
    return max((now or datetime.now(UTC)) - scheduled, timedelta(0))
