"""Extraction job: load the model and the SAEs once, extract each unit of the task, print a summary.

The work itself is `toolkit.extraction`; this layer adds the progress bars and the summary table.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from jobs.progress import extraction_bar
from toolkit import corpus as corpora
from toolkit import models
from toolkit import saes as sae_sources
from toolkit.config import Config, parse_layers
from toolkit.extraction import (
    ExtractionUnit,
    Summary,
    all_units,
    extract_unit,
    fixed_mmap_threshold,
)
from toolkit.plan import human_bytes
from toolkit.rundir import RunDir
from toolkit.stages import Task


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
    saes.own_memory()
    bar = extraction_bar(console)
    summaries = [extract_unit(cfg, lm, saes, corpus, unit, layers, bar) for unit in todo]
    print_summary(summaries, console)
    return summaries


def print_summary(summaries: list[Summary], console: Console) -> None:
    table = Table(title="Extraction")
    for col in ("language", "sentences", "truncated", "tokens", "seconds", "tok/s", "file size", "mean L0", ""):
        table.add_column(col, justify="left" if col in ("language", "") else "right")
    for s in summaries:
        cut = "?" if s.truncated is None else f"[yellow]{s.truncated:,}[/]" if s.truncated else "0"
        table.add_row(s.lang, f"{s.sentences:,}", cut, f"{s.tokens:,}", f"{s.seconds:.1f}",
                      f"{s.tokens / max(s.seconds, 1e-9):,.0f}", human_bytes(s.path.stat().st_size), f"{s.mean_l0:.1f}",
                      "already done" if s.skipped else "")
    console.print(table)
