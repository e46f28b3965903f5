"""The command line's commands, declared once: one per stage (run or submit that stage's jobs), `pipeline`
(a chain of stages), and `status` and `cancel`, which read a run's job record instead of running jobs.
The parser, the preflight and the dispatch of `toolkit.submit` read them here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console

from toolkit import cluster, stages
from toolkit.config import Config
from toolkit.errors import UserError
from toolkit.rundir import RunDir


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    sections: tuple[str, ...]  # config sections whose flags the command takes (besides `run`)
    run: Callable[[Config, Console], int]
    stages: Callable[[Config], list[str]] | None = None  # the stages it runs, in order; None: runs no job


def _chain(name: str, help: str, sections: tuple[str, ...]) -> Command:
    """A command that runs or submits jobs: a stage's own, or `pipeline`'s chain of stages."""
    return Command(name, help, sections, lambda cfg, console: cluster.dispatch(cfg, name, console),
                   lambda cfg: cluster.stage_list(cfg, name))


def _status(cfg: Config, console: Console) -> int:
    records, _ = cluster.show_status(cfg.run_dir, console)
    return cluster.wait(cfg.run_dir, records, console) if cfg.run.wait else 0


_EXTRA = (
    _chain("pipeline", "submit extract -> report (-> align -> evaluate) as one dependent chain",
           ("model", "sae", "extract", "report", "align", "eval")),
    Command("status", "show the jobs of a run: stage, language, job id, state, elapsed, log, last error", (),
            _status),
    Command("cancel", "cancel a run's queued or running jobs", (),
            lambda cfg, console: cluster.cancel(cfg.run_dir, console)),
)
COMMANDS: dict[str, Command] = {c.name: c for c in (*(_chain(s.name, s.help, s.sections) for s in stages.all_stages()),
                                                     *_EXTRA)}


def get(name: str) -> Command:
    try:
        return COMMANDS[name]
    except KeyError:
        raise UserError(f"unknown command {name!r}; known commands: {', '.join(COMMANDS)}") from None


def preflight(cfg: Config, command: Command) -> None:
    """Before any job is run or submitted: the executor is known, the run folder (writable, its records
    readable; it must exist when the first stage reads one), then each stage's own checks, so that a refused
    command leaves no trace."""
    names = command.stages(cfg) if command.stages else []
    if not names:
        return
    cluster.executor_class(cfg.run.executor)
    run_dir = RunDir(cfg.run_dir)
    run_dir.check(must_exist=stages.get(names[0]).needs_run, saes=any(stages.get(n).uses_saes for n in names))
    for name in names:
        stages.get(name).preflight(cfg, run_dir)
