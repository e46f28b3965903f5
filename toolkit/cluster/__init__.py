"""Where jobs run: executors behind one interface (`--executor local | debug | slurm`), cluster profiles,
Apptainer wrapping, the job record RUN/jobs.json, and the `status` / `cancel` commands.

- `local` (default, `local.py`): each stage in this process, its tasks merged into one call.
- `debug` (`debug.py`): in this process, each task exactly as a Slurm task runs it (pickled), pdb on failure.
- `slurm` (`slurm.py`): submitit arrays per stage, chained with `afterok`, resumable stages requeued.

The modules: `base` (the Executor interface, chosen by name), `chain` (a command's steps and tasks,
from the stage registry), `job` (the pickled callable), `profile`, `container`, `joblog`, `states`,
`status` (status, wait, cancel). RUN/jobs.json lists every job (stage, language, job id, array task,
submitit folder, logs, submitted time); `status` adds the state (sacct), elapsed time and the last error
line, `cancel` scancels what is still queued or running, `--wait` (or `status --wait`) waits and exits 1
when a job did not complete.
"""

from __future__ import annotations

from rich.console import Console

from toolkit.cluster import debug, local, slurm  # noqa: F401  (they register their executors)
from toolkit.cluster.base import Executor, executor_class, executor_names, get_executor
from toolkit.cluster.chain import Step, absolute, plan, stage_list
from toolkit.cluster.joblog import JobLog
from toolkit.cluster.states import states
from toolkit.cluster.status import cancel, show_status, wait
from toolkit.config import Config

__all__ = ["Executor", "JobLog", "Step", "absolute", "cancel", "describe", "dispatch", "executor_class",
           "executor_names", "get_executor", "plan", "show_status", "stage_list", "states", "wait"]


def describe(cfg: Config, stage: str, console: Console) -> None:
    """`--dry-run`: the jobs a command would run or submit, their chain and (for Slurm) resources."""
    steps = plan(cfg, stage)
    get_executor(cfg, console).describe(steps)


def dispatch(cfg: Config, stage: str, console: Console) -> int:
    """Run or submit a stage (or `pipeline`, its chain) with the configured executor."""
    steps = plan(cfg, stage)
    return get_executor(cfg, console).run(steps)
