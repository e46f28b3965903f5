"""Extraction job: load the model and the SAEs once, extract each unit of the task, print a summary.

The work itself is `toolkit.extraction`; this layer adds the progress bars and the summary table.
"""

from __future__ import annotations

import shlex
from contextlib import ExitStack
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from jobs.progress import Stopwatch, extraction_bar
from toolkit import corpus as corpora
from toolkit import models, sae_training, stages
from toolkit import saes as sae_sources
from toolkit.capture import shared_forward
from toolkit.config import Config, parse_layers
from toolkit.corpus import Corpus
from toolkit.errors import UserError
from toolkit.extraction import (
    Extraction,
    ExtractionUnit,
    Summary,
    all_units,
    base_identity,
    extract_unit,
    fixed_mmap_threshold,
    shard_ids,
    unit_batches,
)
from toolkit.locks import WriterLock
from toolkit.plan import disk_needed, free_bytes, human_bytes
from toolkit.rundir import RunDir
from toolkit.sae_source import SAESource
from toolkit.stages import Task
from toolkit.store import StoreError, identity_diff, portable, recorded_identity, verify

FINDING_BOOT = 200  # the ending's intervals: enough to show their width, a fraction of the report's time


def run(cfg: Config, task: Task | None = None) -> list[Summary]:
    """Extract the task's units (default: every language and shard of the config).

    Everything is checked before the manifest is written or an SAE trained: the corpus, the run folder,
    one writer per file (each unit's lock is held to the end), the identity of files already there and
    the free disk space.
    """
    console = Console(stderr=True)
    clock = Stopwatch()
    fixed_mmap_threshold()
    todo = whole_run(cfg) if task is None or task.units is None else [ExtractionUnit(*u) for u in task.units]
    corpus = corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)
    stages.check_shards(cfg.extract.shards, len(corpus.ids))
    run_dir = RunDir(cfg.run_dir)
    run_dir.check()
    job = extraction_of(cfg)
    with ExitStack() as locks:
        for unit in todo:
            locks.enter_context(WriterLock(job.path(unit)))
        with clock("model assembly and load" if models.needs_assembly(cfg.model) else "model load"):
            lm = models.load(cfg.model)
        layers = parse_layers(cfg.run.layers, lm.n_layers)
        left = check_existing(cfg, lm, corpus, todo, layers)
        check_space(cfg, lm, corpus, left, layers)
        run_dir.write_manifest(cfg, "extract", corpus.hash)
        # SAEs trained on first use run extraction's own batches once and keep them (toolkit.capture)
        plan = lambda: [b for unit in left for b in unit_batches(job, lm, corpus, unit)]
        with shared_forward(lm, layers, plan, sae_training.BUFFER_BYTES) as shared:
            with clock("SAEs"):  # trained here on first use
                saes = sae_sources.load(cfg.sae_setup, lm, layers, corpus, run_dir, console,
                                        fresh=cfg.extract.overwrite)
                saes.own_memory()
            clock.split("SAEs", "forward pass", shared.seconds)
            bar = extraction_bar(console)
            with clock("extraction"):
                summaries = [extract_unit(job, lm, saes, corpus, unit, layers, bar) for unit in todo]
    print_summary(summaries, console)
    if is_whole_run(cfg, todo):
        with clock("finding"):
            print_finding(cfg, console)
    console.print(clock.line(), highlight=False, soft_wrap=True)
    return summaries


def extraction_of(cfg: Config) -> Extraction:
    """The run's extraction: its options, into RUN/activations, recording its preset and adapter."""
    return Extraction(cfg.extract, RunDir(cfg.run_dir).activations, cfg.run.preset, cfg.model.adapter)


def whole_run(cfg: Config) -> list[ExtractionUnit]:
    return all_units(cfg.lang_codes, cfg.extract.shards)


def unit_path(cfg: Config, unit: ExtractionUnit) -> Path:
    return extraction_of(cfg).path(unit)


def check_existing(cfg: Config, lm: models.LoadedModel, corpus: Corpus, units: list[ExtractionUnit],
                   layers: list[int]) -> list[ExtractionUnit]:
    """Refuse damaged files, or files and parts made with another configuration, before any SAE is trained;
    the units left to do."""
    left = []
    sae_source = planned_sae_source(cfg, lm, corpus)
    for unit in units:
        path = unit_path(cfg, unit)
        old = None if cfg.extract.overwrite else recorded_identity(path)
        if old is not None:
            new = {**base_identity(extraction_of(cfg), lm, corpus, unit, layers), **sae_source}
            old = {k: portable(old).get(k) for k in new}
            if old != new:
                where = path if path.exists() else path.with_name(path.name + ".parts")
                raise StoreError(f"{where} was written with a different configuration ({identity_diff(old, new)}); "
                                 "pass --overwrite to start afresh, or use another --run directory")
        if cfg.extract.overwrite or not path.exists():
            left.append(unit)
        else:
            verify(path)  # a finished file counts as done only if it reads back (checked once, recorded)
    return left


def planned_sae_source(cfg: Config, lm: models.LoadedModel, corpus: Corpus) -> dict:
    """`--sae train` names its SAE set (`local:KEY`, the recipe's hash) before training it: an SAE recipe
    that differs from the files' is refused without training another set."""
    if SAESource.parse(cfg.sae.source).kind != "train":
        return {}
    key = sae_training.training_key(cfg.sae_setup, lm, sae_sources.training_corpus(cfg.sae, corpus))
    return {"sae_source": f"local:{key}"}


def check_space(cfg: Config, lm: models.LoadedModel, corpus: Corpus, units: list[ExtractionUnit],
                layers: list[int]) -> None:
    """The dry-run's estimate for what is left to extract must fit on the run folder's disk."""
    need = sum(disk_needed(cfg, corpus.subset(shard_ids(corpus.ids, u.shard, u.n_shards)).texts[u.lang], lm.tokenizer,
                           layers, lm.d_model) for u in units)
    free = free_bytes(cfg.run_dir)
    if need > free:
        raise UserError(f"{cfg.run_dir}: the extraction left to do needs about {human_bytes(need)} (the --dry-run "
                        f"estimate) and {human_bytes(free)} is free there; free some space or choose another --run "
                        "folder, then rerun the same command (it resumes)")


def print_summary(summaries: list[Summary], console: Console) -> None:
    """One row per file; at 80 columns every header shows whole (tests/unit/test_extract_output.py)."""
    skipped = any(s.skipped for s in summaries)
    table = Table(title="Extraction", box=box.SIMPLE_HEAD, show_edge=False,
                  caption="done: finished by an earlier run, not recomputed" if skipped else None)
    for col in ("language", "sentences", "truncated", "tokens", "time", "tok/s", "file", "mean L0"):
        table.add_column(col, justify="left" if col == "language" else "right")
    for s in summaries:
        cut = "?" if s.truncated is None else f"[yellow]{s.truncated:,}[/]" if s.truncated else "0"
        speed = "—" if s.skipped else f"{s.tokens / max(s.seconds, 1e-9):,.0f}"
        table.add_row(s.lang, f"{s.sentences:,}", cut, f"{s.tokens:,}", "done" if s.skipped else f"{s.seconds:.1f} s",
                      speed, human_bytes(s.path.stat().st_size), f"{s.mean_l0:.1f}")
    console.print(table)


def is_whole_run(cfg: Config, done: list[ExtractionUnit]) -> bool:
    """This call extracted every file of the config, English and another language among them: a gap exists."""
    langs = {u.lang for u in done}
    return {(u.lang, u.shard) for u in done} == {(u.lang, u.shard) for u in whole_run(cfg)} and "en" in langs \
        and len(langs) > 1


def print_finding(cfg: Config, console: Console) -> None:
    """The run's headline as `report` computes it, with fewer bootstrap resamples (labelled so), and the
    command that gives the full report."""
    from analysis.gaps import GapOptions, analyse
    from analysis.terminal import headline_panel

    n_boot = min(FINDING_BOOT, cfg.report.n_boot)
    report = analyse(cfg.run_dir, GapOptions(stat=cfg.report.stat, bands=cfg.report.bands or None, n_boot=n_boot,
                                             seed=cfg.run.seed))
    console.print(headline_panel(report))
    cheaper = f"; the report uses {cfg.report.n_boot:,}" if n_boot < cfg.report.n_boot else ", as the report"
    console.print(f"A quick estimate ({n_boot:,} bootstrap resamples for the intervals{cheaper}). Full report, "
                  "tables and figures:", highlight=False)
    console.print(f"  python -m toolkit.submit report --run {shlex.quote(str(cfg.run_dir))}", highlight=False,
                  soft_wrap=True)
