"""The one box filter of the project: metrics pick the best-F1 confidence with it and the plots draw the
smoothed mean curve with it.

It sits below both utils.evaluation.metrics and utils.reporting.plots because metrics hands its figures to plots (ap_per_class with
plot=True, ConfusionMatrix.plot); plots importing it from metrics would close a loop.
"""
from __future__ import annotations

import numpy as np


def smooth(y: np.ndarray, f: float = 0.05) -> np.ndarray:
    """Box-filter y with a window of about 2*f*len(y) taps (odd, so it stays centred), edge values repeated."""
    y = np.asarray(y, dtype=float)
    if len(y) == 0:
        return y.copy()
    nf = round(len(y) * f * 2) // 2 + 1
    pad = nf // 2
    yp = np.concatenate((np.full(pad, y[0]), y, np.full(pad, y[-1])))
    return np.convolve(yp, np.ones(nf) / nf, mode="valid")
