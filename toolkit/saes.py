"""Per-layer SAEs through sae-lens: pretrained releases, directories, local training, random (tests).

Sources (`--sae`):
- `pretrained:RELEASE` — `SAE.from_pretrained(RELEASE, id_template.format(i=layer))` from the hub.
- `dir:PATH` — one sae-lens directory per layer: `PATH/layer_{i}` (or `PATH/{i}`).
- `train` — sae-lens's `SAETrainer` on the model's own activations, all layers fed from the same
  forward passes; saved in sae-lens format under `RUN/saes/{key}/layer_{i}` and reused when present.
  `key` hashes the recipe (`RUN/saes/{key}/training.json`); the run records the set as `local:{key}`.
- `auto` — the preset's pretrained release when the hub answers, else `train`, saying so.
- `random` — seeded random ReLU SAEs, for mechanics tests on the tiny model only.

One instrument per run: with `auto` or `train`, every stage uses the SAE set the run's extraction
recorded in its activation files (`recorded_source`), and stops rather than train a second one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from toolkit import corpus as corpora
from toolkit import hub
from toolkit.capture import hook_name
from toolkit.config import SAEConfig, SAESetup
from toolkit.corpus import Corpus
from toolkit.errors import HubUnreachable, UserError
from toolkit.models import LoadedModel
from toolkit.rundir import RunDir
from toolkit.sae_set import (
    RECIPE_FILE,
    LayerSAE,
    SAESet,
    check,
    from_dir,
    heldout_sentences,
    local_set,
    measure_quality,
)
from toolkit.sae_source import SAESource
from toolkit.sae_training import CORPUS_FIELDS, recipe, train, training_key
from toolkit.store import ActivationFile, activation_files


def training_corpus(sae: SAEConfig, run_corpus: Corpus) -> Corpus:
    """The run's corpus (with its --max-sentences), or `sae.train_corpus` whole, in the run's languages, when one
    is named: naming a training corpus is how SAEs learn from more than the run measures. Held-out ids stay out
    either way."""
    return corpora.load(sae.train_corpus, run_corpus.langs, 0) if sae.train_corpus else run_corpus


def load(setup: SAESetup, lm: LoadedModel, layers: list[int], corpus: Corpus, run: RunDir,
         console: Console | None = None, fresh: bool = False) -> SAESet:
    """Resolve `setup.sae.source` into one checked SAE per layer, with quality figures measured.

    `corpus` is the run's corpus: its held-out ids measure quality; training uses `training_corpus`. `run` is where
    the run's activation files record its SAE set and where local sets live; `fresh` (extract --overwrite)
    ignores the recorded set.
    """
    console = console or Console(stderr=True)
    source = SAESource.parse(setup.sae.source)
    recorded = recorded_source(run) if source.kind in ("auto", "train") and not fresh else None
    if recorded is not None:
        saes = _recorded(setup, lm, layers, corpus, run, recorded, console)
    elif source.kind == "auto":
        reason = hub.offline_reason()  # offline mode set before sae-lens asks: no retry loop
        try:
            saes = _pretrained(setup.sae.release, setup.sae.id_template, layers, lm)
        except HubUnreachable as exc:
            why = f"{reason}; {setup.sae.release} is not in the local cache" if reason else str(exc)
            console.print(f"[yellow]SAEs:[/] {why}: training small SAEs locally instead (cached in the run)",
                          highlight=False)
            saes = train(setup, lm, layers, training_corpus(setup.sae, corpus), run, console)
    elif source.kind == "pretrained":
        saes = _pretrained(source.arg, setup.sae.id_template, layers, lm)
    elif source.kind == "dir":
        saes = from_dir(Path(source.arg), layers, lm)
    elif source.kind == "train":
        saes = train(setup, lm, layers, training_corpus(setup.sae, corpus), run, console)
    else:
        saes = _random(setup.sae.width, layers, lm, setup.seed)
    # x_bar (the FVE's reference point) of an SAE that recorded none comes from the same held-out pass
    missing = [i for i in layers if not math.isfinite(saes.layers[i].fve) or saes.layers[i].mean is None]
    if missing:
        measure_quality(saes, lm, heldout_sentences(corpus), setup.batch_tokens, setup.max_length)
    return saes


@dataclass(frozen=True)
class Recorded:
    source: str  # as the activation files have it: "local:KEY", "local:/abs/RUN/saes/KEY", "pretrained:..."
    ids: tuple[str, ...]


def recorded_source(run: RunDir) -> Recorded | None:
    """The SAE set the run's extraction recorded (HDF5 attributes `sae_source`, `sae_ids`), or None before one."""
    found = set()
    for paths in activation_files(run.root).values():
        for path in paths:
            with ActivationFile(path) as f:
                attrs = f.attrs
            found.add(Recorded(str(attrs["sae_source"]), tuple(attrs.get("sae_ids") or ())))
    sources = sorted({r.source for r in found})
    if len(sources) > 1:
        raise UserError(f"{run.activations} was measured with {len(sources)} SAE sets ({', '.join(sources)}); "
                        "extract again with --overwrite so that the run has one instrument")
    return max(found, key=lambda r: len(r.ids)) if found else None


def local_root(run: RunDir, recorded: str) -> Path:
    """The folder of a `local:` SAE set: `local:KEY` lives in RUN/saes/KEY, so a moved run still finds it;
    older runs recorded an absolute path, which is tried first, then its KEY under this run."""
    path = Path(SAESource.parse(recorded).arg)
    if not path.is_absolute():
        return run.sae_set(str(path))
    moved = run.sae_set(path.name)
    return path if path.is_dir() or not moved.is_dir() else moved


def _recorded(setup: SAESetup, lm: LoadedModel, layers: list[int], corpus: Corpus, run: RunDir, recorded: Recorded,
              console: Console) -> SAESet:
    """The SAE set of the run's extraction, for every later stage; a stage that would need another one stops."""
    source = SAESource.parse(recorded.source)
    console.print(f"[bold]SAEs:[/] the set this run's extraction used ({recorded.source})")
    if source.kind == "local":
        root = local_root(run, recorded.source)
        _check_recipe(setup, lm, root, recorded.source)
        missing = [i for i in layers if not (root / f"layer_{i}" / "cfg.json").is_file()]
        if not missing:
            return local_set(root, layers, lm, recorded.source)
        train_on = training_corpus(setup.sae, corpus)
        if training_key(setup, lm, train_on) == root.name:  # same recipe, same corpus: the same instrument
            return _with_source(train(setup, lm, layers, train_on, run, console), recorded.source)
        raise UserError(f"the run's SAE set {recorded.source} has no SAE for layer(s) {missing}, and this command "
                        "would train them on another corpus (its languages differ from the extraction's): run it "
                        "with the extraction's --langs and --corpus, or use a new --run")
    if source.kind == "pretrained":
        try:
            return _pretrained(source.arg, setup.sae.id_template, layers, lm)
        except HubUnreachable as exc:
            raise UserError(f"{exc}; this run's activations were measured with {source}, and SAEs trained locally "
                            "instead would be a second instrument: retry with the hub reachable") from None
    if source.kind == "dir":
        return from_dir(Path(source.arg), layers, lm)
    if source.kind == "random" and source.arg.startswith("seed"):
        return _random(setup.sae.width, layers, lm, int(source.arg.removeprefix("seed")))
    raise UserError(f"this run's activations name an SAE set this lingogap cannot load ({source}); pass --sae")


def _check_recipe(setup: SAESetup, lm: LoadedModel, root: Path, source: str) -> None:
    """Stop when the command asks for SAEs trained another way than the run's; the training corpus may differ
    (a command's languages do), since the run's set is what measured every language."""
    file = root / RECIPE_FILE
    if not file.is_file():
        return  # sets trained before the recipe was written: the record is all there is
    saved = json.loads(file.read_text())
    wanted = recipe(setup, lm, None)
    differ = [f"{k}={saved.get(k)!r} (asked: {v!r})" for k, v in wanted.items()
              if k not in CORPUS_FIELDS and saved.get(k) != v]
    if differ:
        raise UserError(f"this run's activations were measured with SAE set {source} trained with "
                        f"{', '.join(differ)}; training another set would make a second instrument: drop those "
                        "options, use a new --run, or choose a set explicitly with --sae dir:PATH")


def _with_source(saes: SAESet, source: str) -> SAESet:
    saes.source = source  # an older run's absolute record stays as recorded, so its files' fingerprints match
    return saes


def _pretrained(release: str, template: str, layers: list[int], lm: LoadedModel) -> SAESet:
    from sae_lens import SAE

    hub.offline_reason()
    out = {}
    for layer in layers:
        sae_id = template.format(i=layer)
        try:
            sae = SAE.from_pretrained(release, sae_id, device=str(lm.device))
        except ValueError as exc:  # unknown release or id: the user's typo, not the network
            raise UserError(f"sae-lens has no SAE {sae_id!r} in release {release!r}: {exc}") from None
        except Exception as exc:  # offline: LocalEntryNotFoundError, connection errors
            raise HubUnreachable(
                f"cannot download SAE {release}/{sae_id} (hub unreachable: {type(exc).__name__})"
            ) from None
        check(sae, layer, lm.d_model, f"{release}/{sae_id}")
        out[layer] = LayerSAE(layer, sae.eval(), f"{release}/{sae_id}")
    return SAESet(f"pretrained:{release}", out)


def _random(width: int, layers: list[int], lm: LoadedModel, seed: int) -> SAESet:
    from sae_lens import StandardSAE, StandardSAEConfig

    out = {}
    for layer in layers:
        torch.manual_seed(seed * 1000 + layer)
        cfg = StandardSAEConfig(d_in=lm.d_model, d_sae=width, device=str(lm.device))
        cfg.metadata.hook_name = hook_name(layer)
        out[layer] = LayerSAE(layer, StandardSAE(cfg).eval(), f"random:seed{seed}/layer_{layer}")
    return SAESet(f"random:seed{seed}", out)


