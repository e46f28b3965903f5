"""`--executor debug` (or `--debug`): in this process, but each call is exactly what a Slurm task runs.

The job object is pickled and unpickled with cloudpickle, one per language or shard, exceptions keep
their traceback, and with a terminal a post-mortem pdb opens at the failing frame.
"""

from __future__ import annotations

import pdb
import sys
import traceback

from toolkit.cluster.base import register_executor
from toolkit.cluster.chain import Step
from toolkit.cluster.job import make_job
from toolkit.cluster.local import LocalExecutor
from toolkit.stages import Task


@register_executor
class DebugExecutor(LocalExecutor):
    name = "debug"

    def tasks(self, step: Step) -> list[Task]:
        return step.tasks

    def call(self, stage: str, task: Task) -> None:
        import cloudpickle

        # exactly what a Slurm task would unpickle and call
        job = cloudpickle.loads(cloudpickle.dumps(make_job(self.cfg, stage, task)))
        job()

    def failed(self, exc: BaseException) -> None:
        if sys.stdin.isatty() and not isinstance(exc, SystemExit):
            traceback.print_exc()
            pdb.post_mortem(exc.__traceback__)
