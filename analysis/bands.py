"""Early / middle / deep layer bands: thirds of the analysed layers unless given explicitly."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from toolkit.errors import UserError
from toolkit.layers import band_ranges

BAND_NAMES = ("early", "middle", "deep")


def default_bands(layers: Sequence[int]) -> dict[str, list[int]]:
    """Thirds of the layer list, the larger thirds first: 26 layers -> 0-8, 9-17, 18-25; 18 -> 0-5, 6-11, 12-17.

    With one or two layers the first is early and the last is deep (one layer is all three)."""
    layers = sorted(layers)
    if len(layers) < 3:
        return {"early": layers[:1], "middle": layers[1:-1], "deep": layers[-1:]}
    return {name: [int(x) for x in part] for name, part in zip(BAND_NAMES, np.array_split(layers, 3), strict=True)}


def parse_bands(spec: str | Sequence[tuple[int, int]] | None, layers: Sequence[int]) -> dict[str, list[int]]:
    """Bands from "0-8,9-17,18-25" (or three (first, last) pairs), keeping the analysed layers in each.

    None gives default_bands(layers). Ranges are inclusive; a single number is a one-layer range.
    """
    if spec is None:
        return default_bands(layers)
    ranges = band_ranges(spec)
    bands = {
        name: [int(x) for x in sorted(layers) if lo <= x <= hi]
        for name, (lo, hi) in zip(BAND_NAMES, ranges, strict=True)
    }
    for name in ("early", "deep"):
        if not bands[name]:
            raise UserError(
                f"bands {spec!r}: no analysed layer falls in the {name} band (layers: {compact(layers)})"
            )
    return bands


def compact(layers: Sequence[int]) -> str:
    """"0-8, 12, 14-15" for a sorted list of layer numbers."""
    layers = sorted(layers)
    runs: list[list[int]] = []
    for x in layers:
        if runs and x == runs[-1][-1] + 1:
            runs[-1].append(x)
        else:
            runs.append([x])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def describe(bands: dict[str, list[int]]) -> str:
    """"early 0-8 · middle 9-17 · deep 18-25"."""
    return " · ".join(f"{name} {compact(layers) or '—'}" for name, layers in bands.items())
