"""The alignment sweep's trade-off: `python -m analysis.align_sweep RUN`.

Reads the `summary` block of each sweep point's `RUN/align/{lang}@{tag}/before_after.json` (nothing
else: the gain report defines its numbers) and writes into RUN/reports/:
- `sweep.csv`: one row per point and target, the summary's fields plus `default` (the point's settings
  are the `align` defaults; any seed) and `pareto` (no other point of the same target that passes its
  guards has at least as much closure at no more English KL, and more closure or less KL);
- `pareto.png`: English KL per token against norm-adjusted gap closure where the summaries give it
  (else gap closure; or `--x`), one colour per target and one marker per objective, points that fail
  a guard grey, each target's front joined by a dashed line, the default ringed;
and prints the table. torch-free.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from toolkit.errors import UserError
from toolkit.files import atomic_write, read_json
from toolkit.rundir import SWEEP_SEP, RunDir, is_point
from toolkit.sweep import default_values

SETTINGS = ("objective", "lambda_align", "lambda_keep", "lr", "lora_targets", "lora_r", "align_layers", "seed")
NUMBERS = (
    "closure_pct",
    "norm_adjusted_gain_pct",
    "gain_pct",
    "english_kl",
    "english_retention_pct",
    "fve_drop",
    "target_bpb",
    "minutes",
)
OPTIONAL = ("norm_adjusted_closure_pct",)  # read when the summary has it
UNRECORDED = ("align_layers",)  # settings older summaries lack: read as unknown (such a point is never the default)
FIELDS = (*SETTINGS, *NUMBERS, "guards_ok")
X_LABELS = {
    "norm_adjusted_closure_pct": "norm-adjusted gap closure (%; 100 = parity with English)",
    "closure_pct": "gap closure (%; 100 = parity with English)",
    "norm_adjusted_gain_pct": "norm-adjusted gain (%)",
    "gain_pct": "activation gain (%)",
}
X_CHOICES = tuple(X_LABELS)
Y = "english_kl"
DPI = 150


@dataclass
class SweepRow:
    name: str  # {unit}@{tag}: the point's folder under RUN/align/
    summary: dict[str, Any]
    default: bool = False
    pareto: bool = False

    @property
    def unit(self) -> str:
        return self.name.partition(SWEEP_SEP)[0]

    @property
    def tag(self) -> str:
        return self.name.partition(SWEEP_SEP)[2]


def load(run: str | Path) -> list[SweepRow]:
    """Every sweep point of the run with a finished gain report, defaults and the Pareto front marked."""
    run_dir = RunDir(run)
    if not run_dir.root.is_dir():
        raise UserError(f"{run}: no such run folder")
    points = {name: path for name, path in run_dir.adapters().items() if is_point(name)}
    if not points:
        raise UserError(
            f"{run}: no sweep point has an adapter under {run_dir.align_root}; run "
            f"`python -m toolkit.submit align --run {run} --sweep grid.yaml` first"
        )
    rows = [
        SweepRow(name, summary) for name in points if (summary := read_summary(run_dir.gain_report(name))) is not None
    ]
    if not rows:
        raise UserError(
            f"{run}: none of its {len(points)} sweep point(s) has a gain report (before_after.json "
            "with a summary block) yet; rerun the sweep to measure them"
        )
    mark(rows, default_x(rows))
    return rows


def read_summary(path: Path) -> dict[str, Any] | None:
    """The `summary` block of a before_after.json (None when the file is not there yet), checked field by field."""
    if not path.is_file():
        return None
    data = read_json(path, "rerun the sweep: align measures the point again")
    summary = data.get("summary") if isinstance(data, dict) else None
    if not isinstance(summary, dict):
        raise UserError(f"{path} has no summary block (made by an older align?); rerun the sweep to measure it")
    for key in FIELDS:
        if key not in summary and key not in UNRECORDED:
            raise UserError(f"{path}: summary has no {key!r}; rerun the sweep to measure it again")
    for key in (*NUMBERS, *OPTIONAL):
        value = summary.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UserError(f"{path}: summary.{key} must be a number or null (got {value!r})")
    if not isinstance(summary["guards_ok"], bool):
        raise UserError(f"{path}: summary.guards_ok must be true or false (got {summary['guards_ok']!r})")
    return {key: summary.get(key) for key in (*FIELDS, *OPTIONAL)}


def mark(rows: list[SweepRow], x: str) -> None:
    """Set `default` (settings equal the align defaults, any seed) and `pareto` (on the front in x up, KL down)."""
    defaults = default_values()
    compared = [k for k in SETTINGS if k in defaults and k != "seed"]
    for row in rows:
        row.default = all(row.summary[k] == defaults[k] for k in compared)
    ok = [r for r in rows if r.summary["guards_ok"] and _finite(r.summary[x]) and _finite(r.summary[Y])]
    for row in rows:
        rivals = [o for o in ok if o.unit == row.unit and o is not row]  # targets differ in their gaps
        row.pareto = row in ok and not any(_dominates(o, row, x) for o in rivals)


def _dominates(a: SweepRow, b: SweepRow, x: str) -> bool:
    ax, ay, bx, by = a.summary[x], a.summary[Y], b.summary[x], b.summary[Y]
    return ax >= bx and ay <= by and (ax > bx or ay < by)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def csv_text(rows: list[SweepRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["point", "unit", "tag", *FIELDS, *OPTIONAL, "default", "pareto"])
    for r in rows:
        writer.writerow(
            [
                r.name,
                r.unit,
                r.tag,
                *("" if r.summary[k] is None else r.summary[k] for k in (*FIELDS, *OPTIONAL)),
                r.default,
                r.pareto,
            ]
        )
    return out.getvalue()


def figure(rows: list[SweepRow], x: str) -> bytes:
    """pareto.png as PNG bytes (matplotlib's object API on the Agg canvas: no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    shown = [r for r in rows if _finite(r.summary[x]) and _finite(r.summary[Y])]
    markers = dict(zip(sorted({str(r.summary["objective"]) for r in shown}), "osD^v<>pPX*h" * 4, strict=False))
    colours = {unit: f"C{i % 10}" for i, unit in enumerate(sorted({r.unit for r in shown}))}
    for r in shown:
        ok = r.summary["guards_ok"]
        ax.scatter(
            r.summary[x],
            r.summary[Y],
            marker=markers[str(r.summary["objective"])],
            zorder=3,
            linewidths=0.5,
            color=colours[r.unit] if ok else "lightgrey",
            edgecolors="black" if ok else "grey",
        )
        if r.default:
            ax.scatter(r.summary[x], r.summary[Y], s=260, facecolors="none", edgecolors="black", zorder=4)
    for unit, colour in colours.items():
        front = sorted((r for r in shown if r.pareto and r.unit == unit), key=lambda r: r.summary[x])
        ax.plot(
            [r.summary[x] for r in front],
            [r.summary[Y] for r in front],
            color=colour,
            linewidth=0.8,
            linestyle="--",
            zorder=2,
            label=f"{unit} (dashed: its Pareto front)",
        )
    for name, m in markers.items():
        ax.scatter([], [], marker=m, color="white", edgecolors="black", label=f"objective {name}")
    ax.scatter([], [], color="lightgrey", edgecolors="grey", label="a guard fails")
    ax.scatter([], [], s=200, facecolors="none", edgecolors="black", label="default settings")
    ax.axvline(100, color="grey", linewidth=0.6, linestyle=":")  # parity with English; beyond is overshoot
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel("English KL (nats per token)")
    ax.set_title(f"alignment sweep: {len(shown)} point(s), {sum(r.pareto for r in shown)} on a front", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()  # fmt: skip


# the table's number columns: the summary field, its heading and its format (sweep.csv has every field)
COLUMNS = (
    ("closure_pct", "closure%", "+.1f"),
    ("norm_adjusted_gain_pct", "adj.gain%", "+.1f"),
    ("english_kl", "En KL", ".4f"),
    ("fve_drop", "ΔFVE", ".3f"),
    ("target_bpb", "bpb", ".3f"),
    ("minutes", "min", ".1f"),
)


def table(rows: list[SweepRow]) -> Table:
    out = Table(
        title=f"alignment sweep · {len(rows)} point(s) · ★ default settings, ◆ Pareto front, ✗ a guard fails",
        caption="closure: of the gap to English; adj.gain: norm-adjusted gain; En KL: nats per English token; "
        "ΔFVE: drop of the SAEs' FVE on adapted activations; bpb: the target's bits per byte; min: wall minutes. "
        "Every field is in sweep.csv",
        title_justify="left",
    )
    out.add_column("unit", no_wrap=True)
    out.add_column("point", min_width=12, overflow="fold")  # a long tag folds; the numbers stay whole
    for _, heading, _ in COLUMNS:
        out.add_column(heading, justify="right", no_wrap=True)
    for r in rows:
        marks = ("★" if r.default else "") + ("◆" if r.pareto else "") + ("" if r.summary["guards_ok"] else "✗")
        cells = [format(r.summary[k], f) if _finite(r.summary[k]) else "—" for k, _, f in COLUMNS]
        out.add_row(r.unit, f"{r.tag} {marks}".rstrip(), *cells, style=None if r.summary["guards_ok"] else "dim")
    return out


def default_x(rows: list[SweepRow]) -> str:
    """Norm-adjusted closure when the summaries give it (the issue's axis: a gain that is not residual scale),
    else closure."""
    adjusted = "norm_adjusted_closure_pct"
    return adjusted if any(_finite(r.summary[adjusted]) for r in rows) else "closure_pct"


def write(rows: list[SweepRow], run: str | Path, x: str = "") -> tuple[Path, Path]:
    """sweep.csv and pareto.png in RUN/reports/, each written atomically; `x` the gain axis (default: `default_x`)."""
    x = x or default_x(rows)
    mark(rows, x)
    reports = RunDir(run).report_folder
    return atomic_write(reports.sweep_csv, csv_text(rows)), atomic_write(reports.pareto_figure, figure(rows, x))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.align_sweep", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder whose RUN/align/{lang}@{tag} points to compare")
    parser.add_argument("--x", choices=X_CHOICES, default="",
                        help="the gain axis of pareto.png and its fronts (default: norm-adjusted closure where every "
                        "point has it, else closure)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        rows = load(args.run)
        paths = write(rows, args.run, args.x)
    except UserError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    console = Console()
    console.print(table(rows))
    console.print(f"wrote {paths[0]} and {paths[1]}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
