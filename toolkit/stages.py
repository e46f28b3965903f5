"""The stage registry: every pipeline stage declared once, looked up by name.

A stage is a job body in `jobs/` with the one signature `run(cfg, task=None)`, plus what the CLI,
the planner and the executors need to know about it: its help, config sections, how it splits into
tasks (array jobs), how a local run merges them (load the model once), whether it resumes after a
requeue, and whether it reads a corpus. Adding a stage = a job module + one `register(Stage(...))`.
torch-free: job bodies are imported only when a stage runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from toolkit import corpus as corpora
from toolkit import sweep
from toolkit.config import Config
from toolkit.errors import UserError
from toolkit.languages import REFERENCE
from toolkit.locks import WriterLock
from toolkit.rundir import SWEEP_SEP, RunDir
from toolkit.store import shard_name
from toolkit.sweep import Point


@dataclass(frozen=True)
class Task:
    """One unit a job runs: all of a stage (`label` "all") or one array task of it.

    `units` are extraction's (lang, shard, n_shards); `langs` are alignment's targets, `points` a sweep's
    grid points (`align --sweep`). None means "everything the config asks for" so a local run needs no
    plan to call a job body.
    """

    label: str = "all"
    units: tuple[tuple[str, int, int], ...] | None = None
    langs: tuple[str, ...] | None = None
    points: tuple[Point, ...] | None = None


def whole(cfg: Config) -> list[Task]:
    return [Task()]


def first(tasks: list[Task]) -> Task:
    return tasks[0]


def nothing_to_check(cfg: Config, run_dir: RunDir) -> None:
    return None


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    sections: tuple[str, ...]  # config sections whose flags the stage takes (besides `run`)
    body: str  # "module:function" of the job body, imported when the stage runs
    split: Callable[[Config], list[Task]] = whole  # the array tasks of a job
    merge: Callable[[list[Task]], Task] = first  # those tasks as one in-process call
    resumable: bool = False  # requeued on preemption/timeout; resumes from its own committed files
    reads_corpus: bool = False
    uses_saes: bool = False
    needs_run: bool = False  # reads a run folder that must exist when a command starts with this stage
    # checks made before anything runs or is submitted, so that a refused command leaves no trace
    preflight: Callable[[Config, RunDir], None] = nothing_to_check

    def job_body(self) -> Callable[..., Any]:
        module, _, name = self.body.partition(":")
        return getattr(importlib.import_module(module), name)


_REGISTRY: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    if stage.name in _REGISTRY:
        raise ValueError(f"stage {stage.name!r} is registered twice")
    _REGISTRY[stage.name] = stage
    return stage


def get(name: str) -> Stage:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown stage {name!r}; known stages: {', '.join(_REGISTRY)}") from None


def all_stages() -> list[Stage]:
    return list(_REGISTRY.values())


def job_stages() -> tuple[str, ...]:
    """The stages in pipeline order (what `--stages` may list)."""
    return tuple(_REGISTRY)


def pipeline_stages(spec: str) -> list[str]:
    """The job stages a `--stages` list names, in its order; an unknown or empty list names the choices."""
    jobs = job_stages()
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in names if s not in jobs]
    if bad or not names:
        raise UserError(f"run.stages: unknown stage(s) {', '.join(bad) or '(none)'}; choose from {', '.join(jobs)}")
    return names


def run(cfg: Config, stage: str, task: Task | None = None) -> Any:
    """Run one stage's job body in this process."""
    return get(stage).job_body()(cfg, task)


# ---------------------------------------------------------------------------------- registrations ---
# Split and merge rules live beside the stages they belong to; they only read the config.

def _extract_tasks(cfg: Config) -> list[Task]:
    n = cfg.extract.shards
    return [Task(lang if n == 1 else f"{lang} {k + 1}/{n}", units=((lang, k, n),))
            for lang in cfg.lang_codes for k in range(n)]


def _extract_merge(tasks: list[Task]) -> Task:
    return Task(",".join(t.label for t in tasks), units=tuple(u for t in tasks for u in t.units or ()))


def align_targets(cfg: Config, langs: list[str] | None = None) -> list[str]:
    """`langs` (a task's), else --targets, else the run's non-English languages; checked before anything is
    submitted."""
    chosen = langs or [t.strip() for t in cfg.align.targets.split(",") if t.strip()]
    chosen = chosen or [lang for lang in cfg.lang_codes if lang != REFERENCE]
    bad = [t for t in chosen if t == REFERENCE or t not in cfg.lang_codes]
    if bad or not chosen:
        raise UserError(f"align.targets: {', '.join(bad) or 'none'}: targets must be non-English languages of the "
                        f"run ({','.join(cfg.lang_codes)})")
    return chosen


def _align_tasks(cfg: Config) -> list[Task]:
    targets = align_targets(cfg)
    units = [Task("joint", langs=tuple(targets))] if cfg.align.joint else [Task(t, langs=(t,)) for t in targets]
    if not cfg.align.sweep:
        return units
    # a sweep: one array task per unit and grid point, each in RUN/align/{unit}@{tag}
    points = sweep.read_grid(cfg.align.sweep, cfg)
    return [Task(sweep.unit_name(u.label, p), langs=u.langs, points=(p,)) for u in units for p in points]


def _align_merge(tasks: list[Task]) -> Task:
    # one call trains each target in turn (or jointly), at each sweep point, with the model loaded once
    points = tuple(dict.fromkeys(p for t in tasks for p in t.points or ())) or None
    if points is None:
        return Task(",".join(t.label for t in tasks), langs=None)
    units = dict.fromkeys(t.label.partition(SWEEP_SEP)[0] for t in tasks)
    return Task(f"{','.join(units)} x {len(points)} sweep points", langs=None, points=points)


def _extract_preflight(cfg: Config, run_dir: RunDir) -> None:
    """No live writer on the files (a second submission is refused before a job loads anything), and no more
    shards than sentences."""
    n = cfg.extract.shards
    for lang in cfg.lang_codes:
        for k in range(n):
            WriterLock(run_dir.activations / shard_name(lang, k, n)).check_free()
    if n > 1:
        check_shards(n, len(corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences).ids))


def check_shards(shards: int, sentences: int) -> None:
    """Every shard of an extraction gets at least one sentence."""
    if shards > sentences:
        raise UserError(f"extract.shards: {shards} shards for {sentences} sentences per language; "
                        f"pass --shards {max(1, sentences)} or fewer")


def _align_preflight(cfg: Config, run_dir: RunDir) -> None:
    """A sweep's grid is read and every point's folder checked (it holds no other point's checkpoint)."""
    if cfg.align.sweep:
        for task in _align_tasks(cfg):
            sweep.check_folder(run_dir.root, task.label, task.points[0])


register(Stage("train-saes", "train (or reuse) one SAE per layer on the model's activations",
               ("model", "sae", "extract"), body="jobs.train_saes:run", reads_corpus=True, uses_saes=True))
register(Stage("extract", "stream every layer's SAE codes into RUN/activations/{lang}.h5",
               ("model", "sae", "extract"), body="jobs.extract:run", split=_extract_tasks, merge=_extract_merge,
               resumable=True, reads_corpus=True, uses_saes=True, preflight=_extract_preflight))
register(Stage("report", "per-language, per-layer activation gaps vs English: tables, figures, JSON/CSV",
               ("report",), body="jobs.report:run", needs_run=True))
register(Stage("align", "train activation-aware LoRA adapters for the target languages",
               ("model", "sae", "extract", "align"), body="jobs.align:run", split=_align_tasks, merge=_align_merge,
               resumable=True, reads_corpus=True, uses_saes=True, preflight=_align_preflight))
register(Stage("evaluate", "ARC-Challenge, MMLU, HellaSwag per language through lm-eval, base vs adapted",
               ("model", "eval"), body="jobs.evaluate:run"))
