"""Executors behind one option: `local` and `debug` run in this process; `slurm` submits with submitit."""

from __future__ import annotations

from rich.console import Console

from toolkit.config import Config
from toolkit.errors import UserError


def stage_function(stage: str):
    if stage == "extract":
        from jobs.extract import run
    elif stage == "train-saes":
        from jobs.train_saes import run
    elif stage == "report":
        from jobs.report import run
    elif stage == "align":
        from jobs.align import run
    elif stage == "evaluate":
        from jobs.evaluate import run
    else:
        raise UserError(f"stage {stage!r} cannot run as a job")
    return run


def dispatch(cfg: Config, stage: str, console: Console) -> int:
    if stage in ("status", "cancel", "pipeline") or cfg.run.executor == "slurm":
        raise UserError(f"{stage} with executor {cfg.run.executor} is not implemented yet (issue: Cluster)")
    stage_function(stage)(cfg, console=console)
    return 0
