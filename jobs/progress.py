"""Rich progress displays shared by the job bodies (the edge where output lives); not a job itself."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from toolkit.extraction import Advance, ProgressFactory


def extraction_bar(console: Console) -> ProgressFactory:
    """One bar per extraction unit: sentences done and tokens per second."""

    @contextmanager
    def bar(lang: str, total: int, completed: int) -> Iterator[Advance]:
        with _progress(console) as progress:
            task = progress.add_task(lang, total=total, completed=completed, tokens=0.0)
            yield lambda sentences, rate: progress.update(task, advance=sentences, tokens=rate)

    return bar


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:>4}"), BarColumn(), MofNCompleteColumn(), TextColumn("sentences"),
        TextColumn("{task.fields[tokens]:,.0f} tok/s"), TimeRemainingColumn(), console=console, transient=False,
    )


class Stopwatch:
    """Wall time of a job's phases, printed as one line at its end: where a run's minutes went."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - start

    def split(self, phase: str, part: str, seconds: float) -> None:
        """Count `seconds` of `phase` as its own phase `part`, placed before it (nothing when 0)."""
        if seconds <= 0:
            return
        self.phases = {**{k: v for k, v in self.phases.items() if k != phase}, part: seconds,
                       phase: self.phases.get(phase, 0.0) - seconds}

    def line(self) -> str:
        parts = [f"{name} {seconds:.1f} s" for name, seconds in self.phases.items()]
        return f"time: {' · '.join(parts)} · total {time.perf_counter() - self.start:.1f} s"
