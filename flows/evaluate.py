"""Flow of the evaluate stage: 10-crop and centre-crop error on the validation store,
a per-class report, the confusion plot's data and a Prefect artifact."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from rich.progress import Progress

from alexnet.atomic import write_bytes, write_json
from alexnet.evaluate import evaluate as evaluate_split
from alexnet.evaluate import load_model_for
from alexnet.params import ComputeParams, EvaluateParams
from alexnet.placement import resolve_devices
from alexnet.reader import LmdbSplit


def _csv(rows: list[dict]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _report(summary: dict, per_class: list[dict], worst: int = 5) -> str:
    lines = [
        "# Evaluation",
        "",
        "| | top-1 error | top-5 error |",
        "|---|---|---|",
        f"| 10-crop | {summary['top1_error']:.4f} | {summary['top5_error']:.4f} |",
        f"| centre crop | {summary['center_top1_error']:.4f} | "
        f"{summary['center_top5_error']:.4f} |",
        "",
        f"{summary['images']} images.",
        "",
        "## Worst classes (top-1 error)",
        "",
        "| class | images | top-1 error | top-5 error |",
        "|---|---|---|---|",
    ]
    rated = [row for row in per_class if row["images"]]
    for row in sorted(rated, key=lambda r: -r["top1_error"])[:worst]:
        lines.append(
            f"| {row['name']} ({row['wnid']}) | {row['images']} | "
            f"{row['top1_error']:.3f} | {row['top5_error']:.3f} |"
        )
    return "\n".join(lines)


@flow(name="evaluate")
def evaluate_flow(
    val: str,
    model_path: str,
    metrics: str,
    evaluate: EvaluateParams,
    compute: ComputeParams,
) -> dict:
    """Write metrics/eval.json, metrics/eval/per_class.csv and metrics/eval/confusion.csv.
    The mean image is the model file's: the one its training subtracted."""
    logger = get_run_logger()
    device = resolve_devices([evaluate.device])[0]
    split = LmdbSplit(val)
    model, payload = load_model_for(split, Path(model_path), device, compute.kernels)
    mean = payload["mean"].float()
    with Progress() as progress:
        bar = progress.add_task("evaluate (10 crops)", total=len(split))
        results = evaluate_split(
            model,
            split,
            mean,
            model.input_size,
            evaluate.batch_size,
            device,
            on_batch=lambda n: progress.advance(bar, n),
        )
    summary = results.summary()
    per_class = results.per_class(split.classes)
    write_json(Path(metrics) / "eval.json", summary)
    write_bytes(Path(metrics) / "eval" / "per_class.csv", _csv(per_class))
    write_bytes(Path(metrics) / "eval" / "confusion.csv", _csv(results.confusion(split.classes)))
    logger.info(
        "10-crop top-1 error %.4f, top-5 %.4f; centre crop %.4f / %.4f; %d images",
        summary["top1_error"],
        summary["top5_error"],
        summary["center_top1_error"],
        summary["center_top5_error"],
        summary["images"],
    )
    create_markdown_artifact(
        _report(summary, per_class), key="evaluation", description="10-crop evaluation"
    )
    return summary


if __name__ == "__main__":
    from flows.stages import main

    main("evaluate", evaluate_flow)
