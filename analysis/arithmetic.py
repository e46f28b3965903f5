"""The gap arithmetic: the one definition of the project's central quantity, a leaf every analysis imports."""

from __future__ import annotations

import numpy as np


def gap_pct(value, reference):
    """The gap: 100 (value - reference) / reference, NaN where the reference is 0 or NaN.

    Scalars give a float, arrays an array."""
    a, ref = np.asarray(value, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(ref != 0, 100 * (a - ref) / ref, np.nan)
    return float(out) if out.ndim == 0 else out
