"""The callable a Slurm (or debug) task runs: one stage for one task, pickled on the submitting side."""

from __future__ import annotations

import os
import sys
from typing import Any

from submitit.helpers import Checkpointable, DelayedSubmission

from toolkit import stages
from toolkit.cluster.container import local_versions, version_mismatches
from toolkit.config import Config
from toolkit.stages import Task

LOG_WIDTH = 120  # columns of Rich output in a log file (no terminal to ask)


class StageJob:
    """One stage for one array task; picklable. `versions` are the submitting side's, checked on arrival."""

    def __init__(self, cfg: Config, stage: str, task: Task | None = None, versions: dict[str, str] | None = None):
        self.cfg, self.stage, self.task, self.versions = cfg, stage, task, versions

    def __call__(self) -> str:
        if self.versions:
            wrong = version_mismatches(self.versions, local_versions(), where="in this job")
            if wrong:
                raise RuntimeError(f"this job's Python does not match the submitting side's ({'; '.join(wrong)}): "
                                   "rebuild the container from containers/Apptainer.def, or submit from the "
                                   "environment the jobs run in")
        if not sys.stderr.isatty():  # the job bodies' consoles read it: wide log lines instead of 80 columns
            os.environ.setdefault("COLUMNS", str(LOG_WIDTH))
        stages.run(self.cfg, self.stage, self.task)
        return f"{self.stage} done"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.stage}, {self.task})"


class ResumableStageJob(StageJob, Checkpointable):
    """A resumable stage (extraction, alignment): on preemption or timeout submitit calls `checkpoint` and
    requeues the task, which repeats the same call; the stage resumes from its committed parts or checkpoints."""

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        return DelayedSubmission(self, *args, **kwargs)


def make_job(cfg: Config, stage: str, task: Task, versions: dict[str, str] | None = None) -> StageJob:
    cls = ResumableStageJob if stages.get(stage).resumable else StageJob
    return cls(cfg, stage, task, versions)
