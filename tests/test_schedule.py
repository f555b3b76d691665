"""The section-5 rule on scripted validation curves."""

from __future__ import annotations

import pytest

from alexnet.schedule import PlateauSchedule

PAPER = {
    "lr_patience": 2,
    "lr_threshold": 0.0,
    "max_lr_drops": 3,
    "stop_at_last_plateau": True,
    "max_epochs_per_rate": None,
}


def run(errors, **options):
    """The rate for the epoch after each error, from 0.01, as the trainer divides it."""
    schedule = PlateauSchedule(**{**PAPER, **options})
    rate, rates = 0.01, []
    for error in errors:
        if schedule.step(error):
            rate /= 10
        rates.append(rate)
        if schedule.stopped:
            break
    return rates, schedule


def test_divides_by_ten_after_patience_epochs_without_improvement():
    rates, schedule = run([0.9, 0.8, 0.8, 0.81, 0.7, 0.6], lr_patience=1)
    assert rates == pytest.approx([0.01, 0.01, 0.01, 0.001, 0.001, 0.001])
    assert schedule.drops == 1 and not schedule.stopped


def test_three_drops_then_stop_at_the_next_plateau():
    rates, schedule = run([0.5] * 20, lr_patience=0)
    assert rates == pytest.approx([0.01, 1e-3, 1e-4, 1e-5, 1e-5])
    assert schedule.drops == 3 and schedule.stopped


def test_runs_on_at_the_last_rate_without_stop():
    rates, schedule = run([0.5] * 10, lr_patience=0, stop_at_last_plateau=False)
    assert len(rates) == 10 and rates[-1] == pytest.approx(1e-5) and not schedule.stopped


def test_threshold_ignores_tiny_improvements():
    rates, _ = run([0.5, 0.499, 0.498], lr_patience=1, lr_threshold=0.01)
    assert rates[-1] == pytest.approx(0.001)


def test_state_round_trip():
    _, schedule = run([0.9, 0.9, 0.9], lr_patience=1)
    other = PlateauSchedule(**PAPER)
    other.load_state_dict(schedule.state_dict())
    assert other == schedule


def test_max_epochs_per_rate_drops_a_still_improving_rate_once_it_is_spent():
    # A slowly improving curve never plateaus; the cap divides after 3 epochs at a rate.
    errors = [0.9, 0.8, 0.7, 0.6, 0.55, 0.5, 0.45]
    rates, schedule = run(errors, lr_patience=2, max_epochs_per_rate=3)
    assert rates == pytest.approx([0.01, 0.01, 0.001, 0.001, 0.001, 1e-4, 1e-4])
    assert schedule.drops == 2
    assert run(errors, lr_patience=2)[0] == pytest.approx([0.01] * 7)  # the paper's rule alone
