"""The evaluate stage's files in `metrics/` (docs/design.md): their names, how they are
written, and the short summary the Prefect UI shows. `alexnet report` reads them back
by the same names.

- `eval.json`: the summary (10-crop and centre-crop errors, the image count);
- `eval/per_class.csv`, `eval/confusion.csv`: the per-class report and every image's
  prediction; `eval/worst_classes.csv`, `eval/worst_confusion.csv`: the same for the
  classes of highest error, the plots' data;
- `eval/<figure>.png` for each of `alexnet.figures.FIGURES`, and `eval/top5.csv`,
  `eval/neighbours.csv`: the figures' numbers.

`eval/` is one output, replaced whole (with its `.alexnet-output` mark), then `eval.json`.
"""

from __future__ import annotations

import base64
import csv
import io
from pathlib import Path

from alexnet.atomic import atomic_output, file_target, folder_target, write_bytes, write_json
from alexnet.figures import FIGURES

SUMMARY, FOLDER = "eval.json", "eval"
EVAL_OWNER = "evaluate"  # the stage named in its folder's mark (alexnet.atomic.OWNED)
PER_CLASS, CONFUSION = "per_class.csv", "confusion.csv"
# The plots' data (tables: eval/<name>.csv), of the classes of highest top-1 error only
# (params evaluate.plot_classes): ImageNet's 1,000 make 1,000 bars and a 1,000 x 1,000
# matrix of 50,000 rows that no one reads.
WORST_CLASSES, WORST_CONFUSION = "worst_classes", "worst_confusion"


def csv_bytes(rows: list[dict]) -> bytes:
    """Rows of one shape as CSV, the header from the first row's keys."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def data_url(png: bytes) -> str:
    """A PNG as a data URL: what an HTML page or a Prefect image artifact can show."""
    return "data:image/png;base64," + base64.b64encode(png).decode()


def worst_first(per_class: list[dict]) -> list[dict]:
    """The per-class rows, highest top-1 error first (as read back from the CSV too,
    where the values are strings and a class without images has none)."""
    return sorted(per_class, key=lambda row: -float(row["top1_error"] or 0))


def worst_classes(per_class: list[dict], count: int) -> list[dict]:
    """The `count` classes of highest top-1 error, worst first, among those the split has
    images of (one without has no error rate to rank)."""
    return worst_first([row for row in per_class if row["images"]])[:count]


def check_targets(metrics: Path) -> None:
    """Where `write_evaluation` will write, checked before the evaluation (hours on
    ImageNet) rather than after it."""
    file_target(metrics / SUMMARY)
    folder_target(metrics / FOLDER, EVAL_OWNER)


def write_evaluation(
    metrics: Path,
    summary: dict,
    per_class: list[dict],
    confusion: list[dict],
    figures: dict[str, bytes],
    tables: dict[str, list[dict]],
) -> None:
    """Every file of the stage (alexnet/atomic.py): the folder `eval/` replaced whole, so
    a run stopped while writing it leaves the previous set (never new files beside old
    ones), then the summary: a new summary means every file is new."""
    with atomic_output(metrics / FOLDER, folder=EVAL_OWNER) as out:
        write_bytes(out / PER_CLASS, csv_bytes(per_class))
        write_bytes(out / CONFUSION, csv_bytes(confusion))
        for name, data in figures.items():
            write_bytes(out / f"{name}.png", data)
        for name, rows in tables.items():
            write_bytes(out / f"{name}.csv", csv_bytes(rows))
    write_json(metrics / SUMMARY, summary)


def markdown_summary(summary: dict, per_class: list[dict], worst: int = 5) -> str:
    """The evaluation as the Prefect UI's markdown artifact: the errors, the worst
    classes, and where the figures are."""
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
    for row in worst_classes(per_class, worst):
        lines.append(
            f"| {row['name']} ({row['wnid']}) | {row['images']} | "
            f"{row['top1_error']:.3f} | {row['top5_error']:.3f} |"
        )
    lines += ["", "## Figures", "", "The artifacts `evaluation-<name>` show them:", ""]
    lines += [f"- `metrics/{FOLDER}/{name}.png`: {what}" for name, what in FIGURES.items()]
    return "\n".join(lines)
