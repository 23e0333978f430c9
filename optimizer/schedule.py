"""The schedule of the teacher's weight (--distill_decay, --distill_floor): one multiplier per epoch on the output,
feature and localisation terms.

    m(e) = floor + (1 - floor) * r(t),  t = e / (epochs - 1)
    linear: r(t) = 1 - t      cos: r(t) = (1 + cos(pi t)) / 2

so m is 1 at the first epoch and `floor` at the last. It is a function of the epoch alone (no accumulated
state), so a resumed run applies exactly the multipliers an uninterrupted one would. The pseudo-label term is
not scheduled: its targets are hard labels on images that have no others, weighted by pseudo_weight alone.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from optimizer.config import DISTILL_DECAYS


def distill_multiplier(decay: str, floor: float, epoch: int, epochs: int) -> float:
    """The multiplier of epoch `epoch` (0-based) of `epochs`: exactly 1.0 at epoch 0 (and for decay 'none'), exactly
    `floor` at the last epoch and after it; a one-epoch run keeps 1."""
    if decay not in DISTILL_DECAYS:
        raise ValueError(f"distill_decay {decay!r}: must be one of {', '.join(DISTILL_DECAYS)}")
    if decay == "none" or epoch <= 0 or epochs <= 1:
        return 1.0
    if epoch >= epochs - 1:
        return float(floor)
    t = epoch / (epochs - 1)
    r = 1.0 - t if decay == "linear" else (1.0 + math.cos(math.pi * t)) / 2
    return floor + (1.0 - floor) * r


class DistillSchedule:
    """One run's schedule: planned over its epochs, a multiplier per epoch on the scheduled terms; with decay
    'none' there is no multiplier at all (nothing is multiplied, no column is logged: such runs keep every
    number)."""

    def __init__(self, decay: str, floor: float):
        """The settings in effect (--distill_decay, --distill_floor)."""
        self.decay, self.floor = decay, floor
        self.epochs = 0
        self.multiplier: float | None = None
        self.columns: tuple[str, ...] = () if decay == "none" else ("distill",)

    def plan(self, epochs: int) -> None:
        """The run's total epochs, which the multiplier falls over."""
        self.epochs = int(epochs)

    def start_epoch(self, epoch: int) -> None:
        """This epoch's multiplier, from the epoch alone (a resumed run gets the same)."""
        if self.columns:
            self.multiplier = distill_multiplier(self.decay, self.floor, epoch, self.epochs)

    def apply(self, loss: Any, parts: Mapping[str, Any], figures: Mapping[str, str]) -> tuple[Any, dict]:
        """A scheduled term's loss and parts times the multiplier (its counts, `figures`, stay as they are)."""
        if self.multiplier is None:
            return loss, dict(parts)
        m = self.multiplier
        return loss * m, {k: v if k in figures else v * m for k, v in parts.items()}

    def values(self) -> dict[str, float]:
        """x/distill: the multiplier in effect (nothing without a decay)."""
        return {} if self.multiplier is None else {"distill": self.multiplier}

    def describe(self, scheduled: Sequence[str]) -> list[str]:
        """The schedule's line for the start of training (none without a decay)."""
        if not self.columns:
            return []
        return [f"Distillation schedule: {self.decay} from 1 at epoch 0 to {self.floor:g} at epoch {self.epochs - 1}, "
                f"on {', '.join(scheduled)} (results.csv x/distill)"]
