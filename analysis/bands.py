"""Early / middle / deep layer bands: thirds of the analysed layers unless given explicitly."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from toolkit.errors import UserError

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
    ranges = _parse_ranges(spec) if isinstance(spec, str) else [tuple(int(v) for v in r) for r in spec]
    if len(ranges) != 3 or any(len(r) != 2 or r[0] > r[1] for r in ranges):
        raise UserError(f"bands {spec!r}: give three inclusive layer ranges, early,middle,deep, e.g. 0-8,9-17,18-25")
    if not (ranges[0][1] < ranges[1][0] and ranges[1][1] < ranges[2][0]):
        raise UserError(f"bands {spec!r}: the ranges must be in order and must not overlap")
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


def _parse_ranges(spec: str) -> list[tuple[int, ...]]:
    out = []
    for part in spec.split(","):
        bounds = part.strip().split("-")
        try:
            values = tuple(int(b) for b in bounds)
        except ValueError:
            raise UserError(f"bands {spec!r}: {part.strip()!r} is not a layer range like 9-17") from None
        out.append(values * 2 if len(values) == 1 else values)
    return out


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
