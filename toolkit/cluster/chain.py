"""The chain a command runs: its stages in order, each split into the tasks of one job (array).

Also the config as jobs see it (absolute paths) and the input checks made before anything is submitted.
Which stages exist, how they split and what they read comes from the registry (`toolkit.stages`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from toolkit import stages
from toolkit.config import Config
from toolkit.corpus import CorpusSpec
from toolkit.sae_source import SAESource
from toolkit.stages import Task


@dataclass
class Step:
    """One stage of a chain and its tasks (one per array task)."""

    stage: str
    tasks: list[Task]


def stage_list(cfg: Config, stage: str) -> list[str]:
    """The stages a command runs, in order. With --sae train, jobs (slurm, debug) get a train-saes job first;
    `local` runs one process that trains them inside the extraction anyway."""
    names = stages.pipeline_stages(cfg.run.stages) if stage == "pipeline" else [stage]
    if SAESource.parse(cfg.sae.source).kind == "train" and cfg.run.executor != "local" and "train-saes" not in names:
        users = [i for i, s in enumerate(names) if stages.get(s).uses_saes]
        if users:  # train once up front instead of inside the first array task (under its file lock)
            names.insert(users[0], "train-saes")
    return names


def plan(cfg: Config, stage: str) -> list[Step]:
    """The steps of `stage` (a job stage, or `pipeline`: the chain `--stages` names)."""
    return [Step(s, stages.get(s).split(cfg)) for s in stage_list(cfg, stage)]


def absolute(cfg: Config) -> Config:
    """A copy whose paths are absolute, so jobs find them whatever their working directory."""
    out = copy.deepcopy(cfg)
    out.run.run = str(Path(cfg.run.run).expanduser().resolve())
    out.run.corpus = _absolute_corpus(cfg.run.corpus)
    out.sae.train_corpus = _absolute_corpus(cfg.sae.train_corpus)
    source = SAESource.parse(cfg.sae.source)
    if source.paths:
        out.sae.source = str(source.absolute())
    for section, name in (("model", "adapter"), ("eval", "bench_data"), ("align", "sweep")):
        value = getattr(getattr(cfg, section), name)
        if value:
            setattr(getattr(out, section), name, str(Path(value).expanduser().resolve()))
    if Path(cfg.model.name).is_dir():
        out.model.name = str(Path(cfg.model.name).resolve())
    return out


def _absolute_corpus(spec: str) -> str:
    parsed = CorpusSpec.parse(spec)
    absolute = parsed.absolute()
    return spec if absolute == parsed else str(absolute)  # other specs stay as written


def check_inputs(cfg: Config, names: list[str]) -> None:
    """Fail before submitting anything when a local input is missing."""
    if any(stages.get(s).reads_corpus for s in names):
        CorpusSpec.parse(cfg.run.corpus).check("run.corpus")
        CorpusSpec.parse(cfg.sae.train_corpus).check("sae.train_corpus")
