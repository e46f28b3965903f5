"""The executor interface: what every executor (local, debug, slurm) offers the CLI.

An executor gets a config and a console, and runs (or submits) a chain of steps; it also says which
calls it would make for a step, which `--dry-run` shows. Implementations register under the name
`--executor` takes, and `get_executor` chooses by that name (submitit's AutoExecutor pattern).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from rich.console import Console
from rich.table import Table

from toolkit.cluster.chain import Step
from toolkit.config import Config
from toolkit.errors import UserError
from toolkit.stages import Task


class Executor(ABC):
    name: ClassVar[str]

    def __init__(self, cfg: Config, console: Console):
        self.cfg, self.console = cfg, console

    @abstractmethod
    def run(self, steps: list[Step]) -> int:
        """Run or submit the steps as one chain (each after the previous one); the command's exit code."""

    def tasks(self, step: Step) -> list[Task]:
        """The calls this executor makes for one step: by default one per array task."""
        return step.tasks

    def title(self) -> str:
        return f"jobs ({self.name})"

    def columns(self) -> tuple[str, ...]:
        """Extra columns of the dry-run table."""
        return ()

    def cells(self, step: Step) -> list[str]:
        """This step's values in the extra columns."""
        return []

    def describe(self, steps: list[Step]) -> None:
        """`--dry-run`: the jobs the chain would run or submit, what each waits for, and extra columns."""
        table = Table(title=self.title())
        for col in ("stage", "tasks", "after", *self.columns()):
            table.add_column(col, overflow="fold")
        for i, step in enumerate(steps):
            labels = ", ".join(t.label for t in self.tasks(step))
            table.add_row(step.stage, labels, steps[i - 1].stage if i else "", *self.cells(step))
        self.console.print(table)


_EXECUTORS: dict[str, type[Executor]] = {}


def register_executor(cls: type[Executor]) -> type[Executor]:
    _EXECUTORS[cls.name] = cls
    return cls


def executor_names() -> tuple[str, ...]:
    return tuple(_EXECUTORS)


def executor_class(name: str) -> type[Executor]:
    """The executor registered as `name`; an unknown name lists the known ones."""
    try:
        return _EXECUTORS[name]
    except KeyError:
        raise UserError(f"run.executor: unknown executor {name!r}; known: {', '.join(_EXECUTORS)}") from None


def get_executor(cfg: Config, console: Console) -> Executor:
    """The executor `run.executor` names, ready to run a chain for `cfg`."""
    return executor_class(cfg.run.executor)(cfg, console)
