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
