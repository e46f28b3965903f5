"""Report job: per-language, per-layer activation gaps vs English from RUN/activations (see `analysis.gaps`)."""

from __future__ import annotations

from rich.console import Console

from toolkit.config import Config
from toolkit.rundir import RunDir
from toolkit.stages import Task


def run(cfg: Config, task: Task | None = None):
    """The report of the whole run; one task: the stage does not split."""
    from analysis.gaps import run_report

    run_dir = RunDir(cfg.run_dir)
    run_dir.check(must_exist=True, saes=False)
    # the report itself goes to stdout (it is the product); progress and errors go to stderr
    report = run_report(cfg.run_dir, stat=cfg.report.stat, bands=cfg.report.bands or None, n_boot=cfg.report.n_boot,
                        seed=cfg.run.seed, console=Console())
    run_dir.write_manifest(cfg, "report")  # a record of what ran: written once the report stands
    return report
