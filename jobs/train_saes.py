"""Train-SAEs job: one SAE per layer on the model's own activations, reused when already trained."""

from __future__ import annotations

from rich.console import Console

from toolkit import models, saes
from toolkit.config import Config, parse_layers
from toolkit.errors import UserError
from toolkit.rundir import RunDir


def run(cfg: Config, console: Console | None = None) -> saes.SAESet:
    console = console or Console(stderr=True)
    if cfg.sae.source not in ("auto", "train"):
        raise UserError(f"train-saes trains local SAEs; --sae {cfg.sae.source} names SAEs that already exist "
                        "(use --sae train, or run extract directly)")
    corpus = saes.training_corpus(cfg)
    RunDir(cfg.run_dir).write_manifest(cfg, "train-saes", corpus.hash)
    lm = models.load(cfg.model)
    trained = saes.train(cfg, lm, parse_layers(cfg.run.layers, lm.n_layers), corpus, console)
    saes.print_quality(trained, console)
    return trained
