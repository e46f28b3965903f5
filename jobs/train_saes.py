"""Train-SAEs job: one SAE per layer on the model's own activations, reused when already trained."""

from __future__ import annotations

from rich.console import Console

from toolkit import corpus as corpora
from toolkit import models, sae_training, saes
from toolkit.config import Config
from toolkit.errors import UserError
from toolkit.layers import parse_layers
from toolkit.rundir import RunDir
from toolkit.sae_set import SAESet
from toolkit.sae_source import SAESource
from toolkit.stages import Task


def run(cfg: Config, task: Task | None = None) -> SAESet:
    """Train (or reuse) the run's SAEs; one task: the stage does not split."""
    console = Console(stderr=True)
    if SAESource.parse(cfg.sae.source).kind not in ("auto", "train"):
        raise UserError(f"train-saes trains local SAEs; --sae {cfg.sae.source} names SAEs that already exist "
                        "(use --sae train, or run extract directly)")
    run_corpus = corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)
    corpus = saes.training_corpus(cfg.sae, run_corpus)
    run_dir = RunDir(cfg.run_dir)
    run_dir.check()
    lm = models.load(cfg.model)
    layers = parse_layers(cfg.run.layers, lm.n_layers)
    run_dir.write_manifest(cfg, "train-saes", corpus.hash)
    return sae_training.train(cfg.sae_setup, lm, layers, corpus, run_dir, console)  # prints its quality
