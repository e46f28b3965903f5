"""Report job: per-language, per-layer activation gaps vs English from RUN/activations (see `analysis.gaps`)."""

from __future__ import annotations

from rich.console import Console

from toolkit.config import Config


def run(cfg: Config, console: Console | None = None):
    from analysis.gaps import run_report

    return run_report(cfg.run_dir, stat=cfg.report.stat, bands=cfg.report.bands or None, n_boot=cfg.report.n_boot,
                      seed=cfg.run.seed, console=console)
