"""A sweep of alignment settings: the grid file, its points, their tags and their folders.

`align --sweep grid.yaml` trains one adapter per target and grid point. The grid maps `align` option
names (the fields of `AlignConfig`, as in a YAML config's `align:` section) and `seed` (`run.seed`:
it draws the train/held-out split as well as the LoRA initialisation and batch order) to lists of
values; its points are their cross product. Values are parsed into the option's type here, at the
edge, by the config's own converters, and every point's config is validated before anything runs.

A point's tag names it, deterministically: `key=value` for every grid key in alphabetical order,
joined by `,`. Numbers are written in their shortest exact form (`1.0` as `1`, `0.0002`, `1e-05`),
booleans as true/false, and in strings every character outside `A-Za-z0-9._-` becomes `+`
(`q_proj,v_proj` -> `q_proj+v_proj`). A tag longer than TAG_MAX keeps its first characters and
ends in `~` and 8 hex digits of its SHA-256. The adapter of target T (or `joint`) at a point
lives in `RUN/align/{T}@{tag}/`, which records the point's values in `point.json`: a folder that
holds another point's record, or checkpoints without a record, is refused before training. The
`none` objective comes first in the grid, and `none_arm` finds a point's none arm among the records.

torch-free: the CLI plans the array from this module without loading a model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.config import AlignConfig, Config, RunConfig, read_yaml
from toolkit.errors import UserError
from toolkit.files import read_json, write_json
from toolkit.rundir import SWEEP_SEP, RunDir, point_name

RUN_KEYS = ("seed",)  # grid keys of the `run` section; everything else is an `align` option
FIXED = ("targets", "joint", "sweep")  # what the sweep is over, not a setting of one point
TAG_MAX = 120  # characters; a folder name is at most 255 bytes, and `{lang}@` comes before the tag
UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
NONE_KEY, NONE = "objective", "none"  # the CE + KL baseline arm
IGNORED_BY_NONE = ("objective", "lambda_align")  # what a none arm's training does not depend on


@dataclass(frozen=True)
class Point:
    """One setting of the grid: its tag and its typed values, (key, value) in the grid's key order."""

    tag: str
    values: tuple[tuple[str, Any], ...]

    def overrides(self) -> dict[str, dict[str, Any]]:
        """The point as config sections, for `Config.merged`."""
        out: dict[str, dict[str, Any]] = {}
        for key, value in self.values:
            out.setdefault("run" if key in RUN_KEYS else "align", {})[key] = value
        return out

    def as_dict(self) -> dict[str, Any]:
        return dict(self.values)


def grid_keys() -> list[str]:
    """The keys a grid may use."""
    return [f.name for f in dataclasses.fields(AlignConfig) if f.name not in FIXED] + list(RUN_KEYS)


def read_grid(path: str | Path, cfg: Config) -> list[Point]:
    """The points of the grid file at `path` over the base config `cfg`; one clear error for a bad grid."""
    data = read_yaml(path, "align.sweep")
    example = "map align option names to lists of values, e.g. `lambda_align: [0.5, 1.0]`"
    if not isinstance(data, dict):
        raise UserError(f"{path}: a grid must be a mapping (got a {type(data).__name__}); {example}")
    if not data:
        raise UserError(f"{path}: empty grid; {example}")
    return expand(data, cfg, str(path))


def expand(grid: dict[str, Any], cfg: Config, where: str = "grid") -> list[Point]:
    """The cross product of `grid` (key -> list of values), each point typed and validated against `cfg`."""
    keys = grid_keys()
    for key, values in grid.items():
        if key in FIXED:
            raise UserError(f"{where}: {key!r} cannot vary in a sweep; set align.{key} outside the grid")
        if key not in keys:
            raise UserError(f"{where}: unknown grid key {key!r}; a grid maps these options to lists: {', '.join(keys)}")
        if not isinstance(values, list):
            raise UserError(f"{where}: {key} must be a list of values (got {values!r}); write {key}: [{values}]")
        if not values:
            raise UserError(f"{where}: {key} is an empty list; give at least one value")
    typed = {key: [_typed(cfg, key, v, where) for v in values] for key, values in grid.items()}
    if NONE_KEY in typed:  # the `none` arm first: a local sweep measures it before the arms compared with it
        typed[NONE_KEY].sort(key=lambda v: v != NONE)
    points = [_point(dict(zip(typed, combo, strict=True))) for combo in itertools.product(*typed.values())]
    seen: dict[str, Point] = {}
    for p in points:
        if p.tag in seen:
            raise UserError(
                f"{where}: two points have the tag {p.tag!r} ({seen[p.tag].as_dict()} and "
                f"{p.as_dict()}); remove the repeated value"
            )
        seen[p.tag] = p
        try:
            apply(cfg, p)  # every point's config is valid before any is submitted
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    return points


def _typed(cfg: Config, key: str, value: Any, where: str) -> Any:
    section = "run" if key in RUN_KEYS else "align"
    try:
        return getattr(getattr(cfg.merged({section: {key: value}}), section), key)
    except UserError as exc:
        raise UserError(f"{where}: {key}: {exc}") from None


def _point(values: dict[str, Any]) -> Point:
    return Point(tag_of(values), tuple(values.items()))


def tag_of(values: dict[str, Any]) -> str:
    """The folder-safe name of a point (the rule is in the module docstring)."""
    tag = ",".join(f"{key}={_spell(values[key])}" for key in sorted(values))
    if len(tag) > TAG_MAX:
        tag = f"{tag[: TAG_MAX - 9]}~{hashlib.sha256(tag.encode()).hexdigest()[:8]}"
    return tag


def _spell(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return UNSAFE.sub("+", str(value))


def apply(cfg: Config, point: Point) -> Config:
    """`cfg` with the point's values, validated (a bad value names its grid key)."""
    out = cfg.merged(point.overrides())
    out.align.sweep = ""  # the point is one ordinary alignment
    try:
        out.validate()
    except UserError as exc:
        raise UserError(f"sweep point {point.tag}: {exc}") from None
    return out


def default_values() -> dict[str, Any]:
    """The dataclass defaults of every grid key: a point equal to them on its keys is the default point."""
    align, run = AlignConfig(), RunConfig()
    return {key: getattr(run if key in RUN_KEYS else align, key) for key in grid_keys()}


def check_folder(run_dir: str | Path, name: str, point: Point) -> None:
    """Refuse the folder RUN/align/{name} of `point` when it holds another point's record, or checkpoints or an
    adapter that no record claims."""
    unit = RunDir(run_dir).align_folder(name)
    record, folder = unit.point_record, unit.root
    fix = f"move {folder} aside (or delete it) and rerun the sweep"
    if record.is_file():
        have = read_json(record, fix)
        theirs = have.get("values") if isinstance(have, dict) else None
        want = _jsonable(point)["values"]
        if theirs != want:
            keys = {*want, *theirs} if isinstance(theirs, dict) else set(want)
            differ = sorted(k for k in keys if not isinstance(theirs, dict) or theirs.get(k) != want.get(k))
            raise UserError(
                f"{folder} holds another sweep point's adapter ({theirs}; it differs in {', '.join(differ)}); {fix}"
            )
    elif any(unit.checkpoints.glob("step-*")) or unit.adapter.exists():
        raise UserError(f"{folder} holds checkpoints of another run, not of this sweep point (no {record.name}); {fix}")


def claim(run_dir: str | Path, name: str, point: Point) -> None:
    """Check the point's folder and record the point in it, before training writes anything there."""
    check_folder(run_dir, name, point)
    record = RunDir(run_dir).point_record(name)
    if not record.is_file():
        write_json(record, _jsonable(point))


def _jsonable(point: Point) -> dict[str, Any]:
    return {"tag": point.tag, "values": json.loads(json.dumps(point.as_dict()))}


def none_arm(run_dir: str | Path, name: str) -> Path | None:
    """The before_after.json of sweep point `name`'s `none` arm: the recorded point of the same unit whose values
    equal this one's except the objective (`none`) and lambda_align (unused by it), so with the same seed and
    batches. None when `name` is not a sweep point, is a none arm itself, or has no none arm in the run."""
    run = RunDir(run_dir)
    unit, _, tag = name.partition(SWEEP_SEP)
    if not tag or not run.point_record(name).is_file():
        return None
    mine = read_json(run.point_record(name), f"move {run.align(name)} aside and rerun the sweep").get("values", {})
    if mine.get(NONE_KEY) == NONE:
        return None
    for record in run.point_records(unit):
        theirs = read_json(record, f"move {record.parent} aside and rerun the sweep").get("values", {})
        same = all(theirs.get(k) == mine.get(k) for k in {*mine, *theirs} - set(IGNORED_BY_NONE))
        if theirs.get(NONE_KEY) == NONE and same:
            return run.gain_report(record.parent.name)
    return None


def unit_name(unit: str, point: Point) -> str:
    """The name of a target's adapter at a point (its folder under RUN/align/ and its job label)."""
    return point_name(unit, point.tag)
