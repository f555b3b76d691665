"""The train stage's files in `metrics/` (docs/design.md), named once: train writes
them, `alexnet report` reads them back.

- `train.json`: the last epoch's metrics and the number of epochs;
- `train/`: dvclive's folder, with each metric's per-epoch series in
  `train/plots/metrics/<metric>.tsv` and the run's params in `train/params.yaml`
  (dvclive's own layout).
"""

from __future__ import annotations

from pathlib import Path

SUMMARY, LIVE = "train.json", "train"


def series_folder(metrics: Path) -> Path:
    """Where dvclive writes the per-epoch series of a run whose metrics folder is `metrics`."""
    return metrics / LIVE / "plots" / "metrics"


def params_file(metrics: Path) -> Path:
    """Where dvclive records the params of the run whose metrics folder is `metrics`
    (`Live.log_params`): the run's own, whatever params.yaml says since."""
    return metrics / LIVE / "params.yaml"
