"""The learning-rate rule of paper section 5: divide the rate by 10 when the validation
error stops improving at the current rate; after `max_drops` divisions, the next
plateau ends training (or, with `stop_at_last_plateau` off, training runs to its epoch
budget at the last rate).

`max_epochs_per_rate` (not in the paper; off by default) also divides the rate once it
has been used that many epochs: with a budget of a dozen epochs a noisy validation
curve may never plateau in time, and the drop is what settles the weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class PlateauSchedule:
    lr: float
    patience: int = 2  # epochs without improvement that make a plateau
    threshold: float = 0.0  # relative improvement that counts: error < best * (1 - threshold)
    max_drops: int = 3
    stop_at_last_plateau: bool = True
    max_epochs_per_rate: int | None = None
    best: float = float("inf")
    epochs_at_rate: int = 0
    bad_epochs: int = 0
    drops: int = 0
    stopped: bool = False

    def step(self, val_error: float) -> float:
        """Record one epoch's validation error; returns the rate for the next epoch."""
        self.epochs_at_rate += 1
        if val_error < self.best * (1 - self.threshold):
            self.best, self.bad_epochs = val_error, 0
        else:
            self.bad_epochs += 1
        plateau = self.bad_epochs > self.patience
        spent = self.max_epochs_per_rate is not None and (
            self.epochs_at_rate >= self.max_epochs_per_rate
        )
        if (plateau or spent) and self.drops < self.max_drops:
            self.drops += 1
            self.lr /= 10
            self.bad_epochs = self.epochs_at_rate = 0
        elif plateau:
            self.bad_epochs = 0
            self.stopped = self.stop_at_last_plateau
        return self.lr

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
