"""The layer-range grammar, one home: `--layers` selections and `--bands` ranges. torch-free.

`all`, `0-5,12`, `0-25:2` (a range with a stride) and `::3` (a stride over all layers) select layers;
`auto` (alignment only) is every layer but the output layers; bands are three inclusive ranges,
early,middle,deep, such as `0-8,9-17,18-25`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from toolkit.errors import UserError

OUTPUT_SHARE = 6  # align_layers `auto` leaves out the last 1/OUTPUT_SHARE of the layers


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """`all`, `0-5,12`, `0-25:2` (range with stride), `10-` (to the last) or `::3` (stride over all)."""
    spec = spec.strip()
    if spec in ("all", ""):
        return list(range(n_layers))
    chosen: set[int] = set()
    for part in spec.split(","):
        chosen.update(_layer_part(re.sub(r"\s+", "", part), n_layers))
    bad = sorted(i for i in chosen if i >= n_layers)
    if bad:
        raise UserError(f"run.layers: layer(s) {bad} out of range; the model has layers 0-{n_layers - 1}")
    return sorted(chosen)


def aligned_layers(spec: str, n_layers: int) -> list[int]:
    """`align.align_layers`: `auto` is every layer but the last sixth (rounded, at least one; layers 0-14 of 18,
    0-21 of 26), any other spec as `parse_layers` reads it. The last layers turn the residual stream into the
    next token, in the target's own script; leaving them out of the alignment term halved Hindi's bits-per-byte
    cost at the same closure over all layers (docs/alignment.md, "Where the adapter sits")."""
    if spec.strip() != "auto":
        return parse_layers(spec, n_layers)
    return list(range(max(1, n_layers - max(1, round(n_layers / OUTPUT_SHARE)))))


def _layer_part(part: str, n_layers: int) -> range:
    m = re.fullmatch(r"::(\d+)|(\d+)(-(\d*))?(?::(\d+))?", part)
    if not m:
        # `-1` used to read as 0-1; layer ids count from 0 and never from the end.
        hint = "layer ids are not negative and a range needs its start; " if part.startswith("-") else ""
        raise UserError(f"run.layers: cannot parse {part!r}; {hint}use forms like all, 0-5,12 or 0-25:2")
    step = int(m.group(1) or m.group(5) or 1)
    if step < 1:
        raise UserError(f"run.layers: stride must be at least 1 in {part!r}")
    if m.group(1):
        return range(0, n_layers, step)
    start = int(m.group(2))
    end = start if m.group(3) is None else (int(m.group(4)) if m.group(4) else n_layers - 1)
    if end < start:
        raise UserError(f"run.layers: reversed or empty range {part!r}; write the lower layer first, e.g. 2-5")
    return range(start, end + 1, step)


def band_ranges(spec: str | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Three inclusive (first, last) ranges from "0-8,9-17,18-25" (or three pairs), in order, not overlapping.

    A single number is a one-layer range. Which analysed layers fall in each band is for the caller."""
    ranges = _ranges(spec) if isinstance(spec, str) else [tuple(int(v) for v in r) for r in spec]
    if len(ranges) != 3 or any(len(r) != 2 or r[0] > r[1] for r in ranges):
        raise UserError(f"bands {spec!r}: give three inclusive layer ranges, early,middle,deep, e.g. 0-8,9-17,18-25")
    if not (ranges[0][1] < ranges[1][0] and ranges[1][1] < ranges[2][0]):
        raise UserError(f"bands {spec!r}: the ranges must be in order and must not overlap")
    return [(int(r[0]), int(r[1])) for r in ranges]


def _ranges(spec: str) -> list[tuple[int, ...]]:
    out = []
    for part in spec.split(","):
        bounds = part.strip().split("-")
        try:
            values = tuple(int(b) for b in bounds)
        except ValueError:
            raise UserError(f"bands {spec!r}: {part.strip()!r} is not a layer range like 9-17") from None
        out.append(values * 2 if len(values) == 1 else values)
    return out
