"""Shared configuration of the alignment tests: the tiny preset, 40 sentences, six SAE layers, seconds per run."""

import dataclasses
import json

import pytest

from jobs import align as align_job
from toolkit import align, models
from toolkit import corpus as corpora
from toolkit import saes as sae_sources
from toolkit.config import Config, parse_layers
from toolkit.rundir import AlignFolder, RunDir

CLI_OPTS = {"langs": "hi,es", "targets": "hi", "sae": "random", "max-sentences": "40", "max-length": "48",
            "layers": "0-25:5", "steps": "6", "checkpoint-every": "2", "lr": "0.002", "align-layers": "0-25:5",
            "seed": "0", "objective": "mass"}
# `mass`, not the default `massfit`: on random SAEs, which reconstruct nothing, massfit's fit terms outgrow its mass
# hinge; the default's own training is tested on its own (test_trainer).


def cfg_for(run, **overrides) -> Config:
    """The configuration of CLI_OPTS, in Python."""
    values = {
        "run": {"run": str(run), "langs": "hi,es", "max_sentences": 40, "layers": "0-25:5", "seed": 0},
        "sae": {"source": "random"},
        "extract": {"max_length": 48},
        "align": {"targets": "hi", "steps": 6, "checkpoint_every": 2, "lr": 0.002, "align_layers": "0-25:5",
                  "objective": "mass"},
    }
    for key, value in overrides.items():
        section, name = key.split(".")
        values.setdefault(section, {})[name] = value
    return Config.build(values, preset="tiny")


def cli(run) -> list[str]:
    """Arguments of `python -m toolkit.submit` for the reference configuration."""
    args = ["align", "--preset", "tiny", "--run", str(run)]
    for key, value in CLI_OPTS.items():
        args += [f"--{key}", value]
    return args


@pytest.fixture(scope="package")
def reference(tmp_path_factory):
    """One uninterrupted in-process run through the job (train + before/after)."""
    run = tmp_path_factory.mktemp("align_ref")
    cfg = cfg_for(run)
    summaries = align_job.run(cfg)
    return cfg, summaries, json.loads((run / "align" / "hi" / "metrics.json").read_text())


@pytest.fixture(scope="package")
def tiny(tmp_path_factory):
    """The tiny model, its random SAEs at the aligned layers, the corpus and its split."""
    cfg = cfg_for(tmp_path_factory.mktemp("align_tiny"))
    corpus = corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)
    lm = models.load(cfg.model)
    layers = parse_layers(cfg.align.align_layers, lm.n_layers)
    saes = sae_sources.load(cfg.sae_setup, lm, layers, corpus, RunDir(cfg.run_dir))
    split = align.split_ids(corpus.ids, cfg.align.heldout, cfg.align.val_fraction, cfg.run.seed)
    return cfg, lm, saes, corpus, split, layers


def trainer(tiny, folder, dist: align.Dist | None = None, engine: str = "", **settings) -> align.Trainer:
    """A trainer of one `hi` adapter into `folder` on the `tiny` fixture, with uniform layer weights and the
    `align` settings changed by `settings`."""
    cfg, lm, saes, corpus, split, layers = tiny
    unit = align.AlignUnit(dataclasses.replace(cfg.align, **settings), ["hi"], split, cfg.run.seed)
    inputs = align.AlignInputs(lm, saes, corpus, cfg.extract.max_length, cfg.extract.batch_tokens,
                               dist or align.Dist(), engine)
    return align.Trainer(unit, inputs, {"hi": align.weights_from_gaps(None, layers)}, AlignFolder(folder))
