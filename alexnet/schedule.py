"""The learning-rate rule of paper section 5: divide the rate by 10 when the validation
error stops improving at the current rate; after `max_lr_drops` divisions, the next
plateau ends training (or, with `stop_at_last_plateau` off, training runs to its epoch
budget at the last rate).

`max_epochs_per_rate` (not in the paper; off by default) also divides the rate once it
has been used that many epochs: with a budget of a dozen epochs a noisy validation
curve may never plateau in time, and the drop is what settles the weights.

The fields carry the names of params `train` (alexnet/params.py). The schedule decides
*when* to divide; the rate itself lives in one place, the optimizer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class PlateauSchedule:
    lr_patience: int  # a plateau: more epochs than this without improvement
    lr_threshold: float  # relative improvement that counts: error < best * (1 - threshold)
    max_lr_drops: int
    stop_at_last_plateau: bool
    max_epochs_per_rate: int | None
    best: float = float("inf")
    epochs_at_rate: int = 0
    bad_epochs: int = 0
    drops: int = 0
    stopped: bool = False

    def step(self, val_error: float) -> bool:
        """Record one epoch's validation error; returns whether to divide the rate by 10."""
        self.epochs_at_rate += 1
        if val_error < self.best * (1 - self.lr_threshold):
            self.best, self.bad_epochs = val_error, 0
        else:
            self.bad_epochs += 1
        plateau = self.bad_epochs > self.lr_patience
        spent = self.max_epochs_per_rate is not None and (
            self.epochs_at_rate >= self.max_epochs_per_rate
        )
        if (plateau or spent) and self.drops < self.max_lr_drops:
            self.drops += 1
            self.bad_epochs = self.epochs_at_rate = 0
            return True
        if plateau:
            self.bad_epochs = 0
            self.stopped = self.stop_at_last_plateau
        return False

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
