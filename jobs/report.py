"""Report job: per-language, per-layer activation gaps vs English from RUN/activations (see `analysis.gaps`)."""

from __future__ import annotations

from rich.console import Console

from analysis import summary as run_summary
from toolkit.config import Config
from toolkit.files import atomic_write, write_json
from toolkit.rundir import CompareFolder, RunDir
from toolkit.stages import Task


def run(cfg: Config, task: Task | None = None):
    """The report of the whole run; one task: the stage does not split."""
    from analysis.gaps import GapOptions, run_report

    run_dir = RunDir(cfg.run_dir)
    run_dir.check(must_exist=True, saes=False)
    # the report itself goes to stdout (it is the product); progress and errors go to stderr
    console = Console()
    options = GapOptions(stat=cfg.report.stat, bands=cfg.report.bands or None, n_boot=cfg.report.n_boot,
                         seed=cfg.run.seed, allow_id_mismatch=cfg.report.allow_id_mismatch)
    report = run_report(cfg.run_dir, options, console=console)
    summary = run_summary.collect(cfg.run_dir, gaps=_gap_summary(report))
    for part in run_summary.renderables(summary):
        console.print(part)
    run_summary.write(summary, run_dir.report_folder)
    if cfg.report.compare:
        _compare(cfg, run_dir, console)
    text = run_dir.report_folder.report_text
    atomic_write(text, text.read_text(encoding="utf-8") + run_summary.render_text(summary))  # gap report, then the rest
    run_dir.write_manifest(cfg, "report")  # a record of what ran: written once the report stands
    return report


def _compare(cfg: Config, run_dir: RunDir, console: Console) -> None:
    """This run beside the --compare runs (their reports must exist): table, compare.json, compare.png."""
    from analysis import compare

    others = [p.strip() for p in cfg.report.compare.split(",") if p.strip()]
    comparison = compare.compare([compare.load_run(p) for p in (str(cfg.run_dir), *others)], cfg.report.bands or None)
    out = CompareFolder(run_dir.compare)
    write_json(out.json, comparison.to_json())
    compare.figure(comparison, out.figure)
    compare.render(comparison, console)


def _gap_summary(report) -> dict:
    """The gap headline and the instrument check's verdicts, for summary.json."""
    import dataclasses

    panel = report.instrument
    return {"statistic": report.statistic, "headlines": [dataclasses.asdict(h) for h in report.headlines],
            "verdicts": panel.verdicts if panel else [], "low_fidelity": panel.low_fidelity if panel else [],
            "notes": report.notes}
