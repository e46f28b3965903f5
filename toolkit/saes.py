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

from toolkit import hub
from toolkit.capture import hook_name
from toolkit.config import Config
from toolkit.corpus import HELDOUT_FRACTION, Corpus, is_heldout  # noqa: F401 (re-exported)
from toolkit.errors import HubUnreachable, UserError
from toolkit.models import LoadedModel
from toolkit.sae_set import (
    LayerSAE,
    SAESet,
    check,
    from_dir,
    heldout_sentences,
    local_set,
    measure_quality,
)
from toolkit.sae_source import SAESource as SAESource  # re-exported: `--sae` parsed, torch-free
from toolkit.sae_training import CORPUS_FIELDS, recipe, train, training_key


def training_corpus(cfg: Config, run_corpus: Corpus | None = None) -> Corpus:
    """The run's corpus (with its --max-sentences), or `sae.train_corpus` whole when one is named: naming a
    training corpus is how SAEs learn from more than the run measures. Held-out ids stay out either way."""
    from toolkit import corpus as corpora

    if cfg.sae.train_corpus:
        return corpora.load(cfg.sae.train_corpus, cfg.lang_codes, 0)
    if run_corpus is not None:
        return run_corpus
    return corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)


def load(cfg: Config, lm: LoadedModel, layers: list[int], corpus: Corpus, console: Console | None = None) -> SAESet:
    """Resolve `cfg.sae.source` into one checked SAE per layer, with quality figures measured.

    `corpus` is the run's corpus: its held-out ids measure quality; training uses `training_corpus`.
    """
    console = console or Console(stderr=True)
    source = cfg.sae.source
    recorded = recorded_source(cfg.run_dir) if source in ("auto", "train") and not cfg.extract.overwrite else None
    if recorded is not None:
        saes = _recorded(cfg, lm, layers, corpus, recorded, console)
    elif source == "auto":
        reason = hub.offline_reason()  # offline mode set before sae-lens asks: no retry loop
        try:
            saes = _pretrained(cfg.sae.release, cfg.sae.id_template, layers, lm)
        except HubUnreachable as exc:
            why = f"{reason}; {cfg.sae.release} is not in the local cache" if reason else str(exc)
            console.print(f"[yellow]SAEs:[/] {why}: training small SAEs locally instead (cached in the run)",
                          highlight=False)
            saes = train(cfg, lm, layers, training_corpus(cfg, corpus), console)
    elif source.startswith("pretrained:"):
        saes = _pretrained(source.split(":", 1)[1], cfg.sae.id_template, layers, lm)
    elif source.startswith("dir:"):
        saes = from_dir(Path(source.split(":", 1)[1]), layers, lm)
    elif source == "train":
        saes = train(cfg, lm, layers, training_corpus(cfg, corpus), console)
    else:
        saes = _random(cfg.sae.width, layers, lm, cfg.run.seed)
    # x_bar (the FVE's reference point) of an SAE that recorded none comes from the same held-out pass
    missing = [i for i in layers if not math.isfinite(saes.layers[i].fve) or saes.layers[i].mean is None]
    if missing:
        measure_quality(saes, lm, heldout_sentences(corpus), cfg.extract.batch_tokens, cfg.extract.max_length)
    return saes


@dataclass(frozen=True)
class Recorded:
    source: str  # as the activation files have it: "local:KEY", "local:/abs/RUN/saes/KEY", "pretrained:..."
    ids: tuple[str, ...]


def recorded_source(run_dir: str | Path) -> Recorded | None:
    """The SAE set the run's extraction recorded (HDF5 attributes `sae_source`, `sae_ids`), or None before one."""
    from toolkit.store import ActivationFile, activation_files

    found = set()
    for paths in activation_files(run_dir).values():
        for path in paths:
            with ActivationFile(path) as f:
                attrs = f.attrs
            found.add(Recorded(str(attrs["sae_source"]), tuple(attrs.get("sae_ids") or ())))
    sources = sorted({r.source for r in found})
    if len(sources) > 1:
        raise UserError(f"{run_dir}/activations was measured with {len(sources)} SAE sets ({', '.join(sources)}); "
                        "extract again with --overwrite so that the run has one instrument")
    return max(found, key=lambda r: len(r.ids)) if found else None


def local_root(run_dir: str | Path, recorded: str) -> Path:
    """The folder of a `local:` SAE set: `local:KEY` lives in RUN/saes/KEY, so a moved run still finds it;
    older runs recorded an absolute path, which is tried first, then its KEY under this run."""
    path = Path(recorded.removeprefix("local:"))
    if not path.is_absolute():
        return Path(run_dir) / "saes" / path
    moved = Path(run_dir) / "saes" / path.name
    return path if path.is_dir() or not moved.is_dir() else moved


def _recorded(cfg: Config, lm: LoadedModel, layers: list[int], corpus: Corpus, recorded: Recorded,
              console: Console) -> SAESet:
    """The SAE set of the run's extraction, for every later stage; a stage that would need another one stops."""
    source = recorded.source
    console.print(f"[bold]SAEs:[/] the set this run's extraction used ({source})")
    if source.startswith("local:"):
        root = local_root(cfg.run_dir, source)
        _check_recipe(cfg, lm, root, source)
        missing = [i for i in layers if not (root / f"layer_{i}" / "cfg.json").is_file()]
        if not missing:
            return local_set(root, layers, lm, source)
        train_on = training_corpus(cfg, corpus)
        if training_key(cfg, lm, train_on) == root.name:  # same recipe, same corpus: the same instrument
            return _with_source(train(cfg, lm, layers, train_on, console), source)
        raise UserError(f"the run's SAE set {source} has no SAE for layer(s) {missing}, and this command would "
                        "train them on another corpus (its languages differ from the extraction's): run it with the "
                        "extraction's --langs and --corpus, or use a new --run")
    if source.startswith("pretrained:"):
        try:
            return _pretrained(source.split(":", 1)[1], cfg.sae.id_template, layers, lm)
        except HubUnreachable as exc:
            raise UserError(f"{exc}; this run's activations were measured with {source}, and SAEs trained locally "
                            "instead would be a second instrument: retry with the hub reachable") from None
    if source.startswith("dir:"):
        return from_dir(Path(source.split(":", 1)[1]), layers, lm)
    if source.startswith("random:seed"):
        return _random(cfg.sae.width, layers, lm, int(source.removeprefix("random:seed")))
    raise UserError(f"this run's activations name an SAE set this lingogap cannot load ({source}); pass --sae")


def _check_recipe(cfg: Config, lm: LoadedModel, root: Path, source: str) -> None:
    """Stop when the command asks for SAEs trained another way than the run's; the training corpus may differ
    (a command's languages do), since the run's set is what measured every language."""
    file = root / "training.json"
    if not file.is_file():
        return  # sets trained before the recipe was written: the record is all there is
    saved = json.loads(file.read_text())
    wanted = recipe(cfg, lm, None)
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


