"""`alexnet report`: one self-contained HTML page of a run -- the evaluation's metrics,
the training curves, section 6.1's figures and the params the training run recorded
(not params.yaml as it is now) -- that opens without network
access: the figures are PNGs inside the page as data URLs, the curves are drawn here
with matplotlib from dvclive's files, and there is no script.

It reads only files the stages wrote (docs/design.md, "Metrics"); a file that is not
there yet leaves its section saying which stage writes it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

import jinja2
from matplotlib.figure import Figure

from alexnet.atomic import file_target, write_bytes
from alexnet.errors import AlexnetError, one_line
from alexnet.eval_files import FOLDER, PER_CLASS, SUMMARY, data_url, worst_first
from alexnet.figures import FIGURES, png
from alexnet.train_files import SUMMARY as TRAIN_SUMMARY
from alexnet.train_files import params_file, series_folder

# dvclive's per-epoch series (metrics/train/plots/metrics/<name>.tsv), one panel each group
PANELS = {
    "loss": ("train_loss", "val_loss"),
    "top-k error": ("train_top1_error", "val_top1_error", "val_top5_error"),
    "learning rate": ("lr",),
}

PAGE = jinja2.Template(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body { font: 15px/1.45 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: .5em 0 1.2em; }
td, th { border: 1px solid #ccc; padding: .25em .7em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; } figure { margin: 1em 0 2em; }
figcaption { color: #555; font-size: 90%; } .missing { color: #a33; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; font-size: 85%; }
</style></head><body>
<h1>{{ title }}</h1>
<p>Written by <code>alexnet report</code> from <code>{{ metrics }}</code>. Errors are fractions
of the validation images.</p>

<h2>Evaluation (10-crop, paper section 4.1)</h2>
{% if evaluation %}
<table><tr><th></th><th>top-1 error</th><th>top-5 error</th></tr>
<tr><td>10 crops</td><td>{{ "%.4f"|format(evaluation.top1_error) }}</td>
<td>{{ "%.4f"|format(evaluation.top5_error) }}</td></tr>
<tr><td>centre crop</td><td>{{ "%.4f"|format(evaluation.center_top1_error) }}</td>
<td>{{ "%.4f"|format(evaluation.center_top5_error) }}</td></tr></table>
<p>{{ evaluation.images }} validation images.</p>
{% else %}<p class="missing">No eval.json yet: the evaluate stage writes it.</p>{% endif %}

<h2>Training</h2>
{% if training %}
<table><tr>{% for key in training %}<th>{{ key }}</th>{% endfor %}</tr>
<tr>{% for value in training.values() %}<td>{{ value }}</td>{% endfor %}</tr></table>
{% else %}<p class="missing">No train.json yet: the train stage writes it.</p>{% endif %}
{% if curves %}<figure><img alt="training curves" src="{{ curves }}">
<figcaption>Per epoch, from dvclive's files in train/plots/metrics/.</figcaption></figure>
{% endif %}

<h2>What the network learned (paper section 6.1)</h2>
{% for name, caption, url in figures %}
<figure>{% if url %}<img alt="{{ name }}" src="{{ url }}">{% else %}
<p class="missing">No eval/{{ name }}.png yet: the evaluate stage writes it.</p>{% endif %}
<figcaption>{{ caption }}</figcaption></figure>
{% endfor %}

<h2>Per class</h2>
{% if per_class %}
<details><summary>{{ per_class|length }} classes, worst top-1 error first</summary>
<table><tr>{% for key in per_class[0] %}<th>{{ key }}</th>{% endfor %}</tr>
{% for row in per_class %}<tr>{% for value in row.values() %}<td>{{ value }}</td>{% endfor %}
</tr>{% endfor %}</table></details>
{% else %}<p class="missing">No eval/per_class.csv here: the evaluate stage writes it (in a
clone, <code>dvc pull</code> brings a run's).</p>{% endif %}

<h2>Params</h2>
{% if params %}<p>The training run's, as it recorded them in <code>train/params.yaml</code>.</p>
<pre>{{ params }}</pre>
{% else %}<p class="missing">No train/params.yaml here: the train stage writes it (in a clone,
<code>dvc pull</code> brings a run's).</p>{% endif %}
</body></html>
""",
    autoescape=True,
)


# What the page shows of eval.json (the evaluate stage writes them all).
EVALUATION_KEYS = ("top1_error", "top5_error", "center_top1_error", "center_top5_error", "images")


def _json(path: Path, needed: Sequence[str] = ()) -> dict | None:
    """A metrics file's object, None where there is none; one error line for a file cut
    short, not an object, or without a key the page shows (an older version's)."""
    if (text := _text(path)) is None:
        return None
    try:
        content = json.loads(text)
    except ValueError as error:
        raise AlexnetError(
            f"{path}: not readable JSON ({one_line(error)}); run its stage again"
        ) from None
    if not isinstance(content, dict):
        raise AlexnetError(f"{path}: not a JSON object; run its stage again")
    if missing := [key for key in needed if key not in content]:
        raise AlexnetError(f"{path}: no {missing[0]} (an older version's?); run its stage again")
    if odd := [key for key in needed if not _number(content[key])]:
        raise AlexnetError(f"{path}: its {odd[0]} is not a number; run its stage again")
    return content


def _text(path: Path) -> str | None:
    """A text file's content, None where there is none."""
    if not path.is_file():
        return None
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise AlexnetError(
            f"{path}: not readable ({one_line(error)}); run its stage again"
        ) from None


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _csv_rows(path: Path, needed: Sequence[str] = (), **options: str) -> list[dict]:
    """A CSV (or TSV) file's rows; one error line for one that is not text or lacks a
    column the page shows."""
    try:
        with path.open(newline="") as file:
            reader = csv.DictReader(file, **options)
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise AlexnetError(
            f"{path}: not readable ({one_line(error)}); run its stage again"
        ) from None
    if missing := [key for key in needed if key not in (reader.fieldnames or ())]:
        raise AlexnetError(f"{path}: no {missing[0]} column; run its stage again")
    return rows


def _readable(row: dict | None) -> dict | None:
    """Floats to 4 significant digits, for a table (a loss has 16)."""
    if row is None:
        return None
    return {
        key: f"{value:.4g}" if isinstance(value, float) else value for key, value in row.items()
    }


def read_series(folder: Path) -> dict[str, tuple[list[int], list[float]]]:
    """dvclive's series: name -> (epochs from 1, values). dvclive appends to its files
    in place: a line that a killed run cut short (fields missing, or not numbers) is
    left out."""
    series = {}
    for path in sorted(folder.glob("*.tsv")):
        points = []
        for row in _csv_rows(path, delimiter="\t"):
            with suppress(KeyError, TypeError, ValueError):  # a field missing, or None
                points.append((int(row["step"]) + 1, float(row[path.stem])))
        if points:  # (a file of a header alone: no curve)
            series[path.stem] = ([step for step, _ in points], [value for _, value in points])
    return series


def curves_figure(series: dict[str, tuple[list[int], list[float]]]) -> Figure | None:
    """One panel per group of `PANELS` that has data; None when there is none."""
    panels = {
        title: [n for n in names if n in series]
        for title, names in PANELS.items()
        if any(n in series for n in names)
    }
    if not panels:
        return None
    figure = Figure(figsize=(4.2 * len(panels), 3.2), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]  # (one panel: still a row)
    for ax, (title, names) in zip(axes, panels.items(), strict=True):
        for name in names:
            ax.plot(*series[name], marker="o", markersize=3, label=name)
        ax.set(title=title, xlabel="epoch")
        if title == "learning rate":
            ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return figure


def render(metrics: Path) -> str:
    """The page's HTML for the run whose files are in `metrics`."""
    if metrics.exists() and not metrics.is_dir():
        raise AlexnetError(f"{metrics}: a file, not the stages' metrics folder")
    if not metrics.is_dir():
        raise AlexnetError(f"{metrics}: no such folder (run `dvc repro` first)")
    written = [metrics / SUMMARY, metrics / TRAIN_SUMMARY, metrics / FOLDER, series_folder(metrics)]
    if not any(path.exists() for path in written):  # (the series: a first run, training)
        raise AlexnetError(
            f"{metrics}: neither train's nor evaluate's metrics are there (run `dvc repro` "
            "first, or name the folder they went to with --metrics)"
        )
    per_class = []
    if (path := metrics / FOLDER / PER_CLASS).is_file():
        try:
            per_class = worst_first(_csv_rows(path, ("top1_error",)))
        except ValueError:  # (a row cut short is kept: its value is then None)
            raise AlexnetError(
                f"{path}: a top1_error that is not a number; run evaluate again"
            ) from None
    curves = curves_figure(read_series(series_folder(metrics)))
    figures = [
        (
            name,
            FIGURES[name],
            data_url(path.read_bytes())
            if (path := metrics / FOLDER / f"{name}.png").is_file()
            else None,
        )
        for name in FIGURES
    ]
    return PAGE.render(
        title="AlexNet: evaluation report",
        metrics=str(metrics),
        evaluation=_json(metrics / SUMMARY, EVALUATION_KEYS),
        training=_readable(_json(metrics / TRAIN_SUMMARY)),
        curves=data_url(png(curves)) if curves else None,
        figures=figures,
        per_class=per_class,
        params=_text(params_file(metrics)),
    )


def write_report(metrics: Path, out: Path) -> Path:
    """Write the page to `out`. A file there is replaced only if it is an HTML page (an
    earlier report), never another (`-o params.yaml`)."""
    file_target(out)
    if out.is_file() and not _is_html(out):
        raise AlexnetError(f"{out}: a file that is not an HTML page; name another, or remove it")
    write_bytes(out, render(metrics).encode())
    return out


def _is_html(path: Path) -> bool:
    with open(path, "rb") as stream:
        return stream.read(64).lstrip().lower().startswith(b"<!doctype html")
