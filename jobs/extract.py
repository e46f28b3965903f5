"""Extraction job: load the model and the SAEs once, extract each unit of the task, print a summary.

The work itself is `toolkit.extraction`; this layer adds the progress bars and the summary table.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from toolkit import corpus as corpora
from toolkit import models
from toolkit import saes as sae_sources
from toolkit.config import Config, parse_layers
from toolkit.corpus import Corpus
from toolkit.extraction import (
    Advance,
    ExtractionUnit,
    ProgressFactory,
    Summary,
    all_units,
    encode_batch,
    fixed_mmap_threshold,
)
from toolkit.extraction import extract_unit as _extract_unit
from toolkit.plan import human_bytes
from toolkit.rundir import RunDir
from toolkit.stages import Task

# jobs/align.py uses `Unit`, `encode_batch` and `extract_unit(..., console)` from here until it imports
# toolkit.extraction itself.
Unit = ExtractionUnit
__all__ = ["Unit", "encode_batch", "extract_unit", "run"]


def run(cfg: Config, task: Task | None = None) -> list[Summary]:
    """Extract the task's units (default: every language and shard of the config)."""
    console = Console(stderr=True)
    fixed_mmap_threshold()
    todo = all_units(cfg) if task is None or task.units is None else [ExtractionUnit(*u) for u in task.units]
    corpus = corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)
    RunDir(cfg.run_dir).write_manifest(cfg, "extract", corpus.hash)
    lm = models.load(cfg.model)
    layers = parse_layers(cfg.run.layers, lm.n_layers)
    saes = sae_sources.load(cfg, lm, layers, corpus, console)
    saes.drop_decoders()
    summaries = [extract_unit(cfg, lm, saes, corpus, unit, layers, console) for unit in todo]
    print_summary(summaries, console)
    return summaries


def extract_unit(cfg: Config, lm: models.LoadedModel, saes: sae_sources.SAESet, corpus: Corpus,
                 unit: ExtractionUnit, layers: list[int], console: Console) -> Summary:
    """`toolkit.extraction.extract_unit` with a progress bar on `console`."""
    return _extract_unit(cfg, lm, saes, corpus, unit, layers, progress_bar(console))


def progress_bar(console: Console) -> ProgressFactory:
    """One bar per unit: sentences done and tokens per second."""

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


def print_summary(summaries: list[Summary], console: Console) -> None:
    table = Table(title="Extraction")
    for col in ("language", "sentences", "tokens", "seconds", "tok/s", "file size", "mean L0", ""):
        table.add_column(col, justify="left" if col in ("language", "") else "right")
    for s in summaries:
        table.add_row(s.lang, f"{s.sentences:,}", f"{s.tokens:,}", f"{s.seconds:.1f}",
                      f"{s.tokens / max(s.seconds, 1e-9):,.0f}", human_bytes(s.path.stat().st_size), f"{s.mean_l0:.1f}",
                      "already done" if s.skipped else "")
    console.print(table)
