"""Rich progress displays shared by the job bodies (the edge where output lives); not a job itself."""

from __future__ import annotations

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
