"""Layer weights of the alignment term from the target language's measured gap to English.

The gap itself has one home, `analysis.gaps`; this module decides where it is read from (the report's
gaps.csv, else the extracted activations of training and validation ids, else a small measurement).
"""

from __future__ import annotations

import math

import numpy as np

from toolkit.align.data import Split
from toolkit.align.inputs import AlignInputs
from toolkit.capture import iter_batches
from toolkit.languages import REFERENCE
from toolkit.rundir import RunDir

GAP_SENTENCES = 64  # training sentences per language when no gaps were measured before


def weights_from_gaps(gaps: dict[int, float] | None, layers: list[int], mode: str = "gap") -> dict[int, float]:
    """w_l = max(0, -gap_l) scaled to mean 1 over `layers`; all ones for "uniform" or when no layer
    is weaker than English (or gaps are unknown)."""
    uniform = dict.fromkeys(layers, 1.0)
    if mode == "uniform" or not gaps:
        return uniform
    raw = {layer: max(0.0, -gaps[layer]) if math.isfinite(gaps.get(layer, math.nan)) else 0.0 for layer in layers}
    total = sum(raw.values())
    if total <= 0:
        return uniform
    return {layer: raw[layer] * len(layers) / total for layer in layers}


def layer_gaps(inputs: AlignInputs, run: RunDir, lang: str, layers: list[int], split: Split
               ) -> tuple[dict[int, float], str]:
    """T's mass gap to English per layer and where it came from; rank 0 decides, the others follow.
    The run's activation files are read when it has them."""
    found = None
    if inputs.dist.main:
        found = _gaps_and_source(inputs, run, lang, layers, split)
    return inputs.dist.share(found)


def _gaps_and_source(inputs: AlignInputs, run: RunDir, lang: str, layers: list[int], split: Split
                     ) -> tuple[dict[int, float], str]:
    from analysis.gaps import gap_pct, language_gaps

    # Never reports/gaps.csv: it averages over every sentence, the held-out ones that measure the gain included.
    gaps = None
    if run.activations.is_dir():
        gaps = language_gaps(run.root, lang, layers, ids=split.train + split.val, reference=REFERENCE)
    if gaps is not None:
        return gaps, "activations/*.h5 (training and validation ids)"
    ids = split.train[:GAP_SENTENCES]
    sub = inputs.corpus.subset(ids)
    a_lang = mean_mass(inputs, sub.sentences(lang), layers)
    a_ref = mean_mass(inputs, sub.sentences(REFERENCE), layers)
    gaps = {layer: gap_pct(a_lang[layer], a_ref[layer]) for layer in layers}
    return gaps, f"measured on {len(ids)} training sentences"


def mean_mass(inputs: AlignInputs, sentences: list[tuple[str, str]], layers: list[int]) -> dict[int, float]:
    """A(L, l) over `sentences`: mean of the per-sentence mean activation mass, as extraction stores it."""
    from toolkit.extraction import encode_batch

    lm = inputs.lm
    per_layer: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    for batch in iter_batches(sentences, lm.tokenizer, inputs.batch_tokens, inputs.max_length):
        encoded = encode_batch(lm, inputs.saes, batch, layers, save_resid=False)
        for layer in layers:
            per_layer[layer].append(encoded.layers[layer].mass)
    return {layer: float(np.concatenate(v).mean()) for layer, v in per_layer.items()}
