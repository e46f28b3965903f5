"""Before/after numbers of an adapter on held-out text: activation gain, retention, pooled gain, perplexity.

A(L, l) = mean over held-out sentences of the per-sentence mean activation mass (the extraction statistic
`mass`); gain(L, l) = 100 (A_after - A_before) / A_before; retention = 100 A_after / A_before; headline
numbers are means over the measured layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from toolkit.align.data import REFERENCE
from toolkit.capture import iter_batches
from toolkit.models import LoadedModel

PPL_BATCH_TOKENS = 1024  # logits over a 262k vocabulary are ~1 MB per token in float32

DEFINITIONS = {
    "A": "mean over held-out sentences of the per-sentence mean (over tokens, BOS and padding excluded) of the "
         "summed SAE feature activations at the layer",
    "gain_pct": "100 * (A_after - A_before) / A_before per layer; gain_pct_mean averages the layers (the headline), "
                "gain_pct_median is their median, gain_pct_pooled the gain of A summed over layers",
    "retention_pct": "100 * A_after / A_before per layer; english_retention_pct is English's, averaged over layers",
    "ppl": "exp of the mean next-token cross-entropy over the held-out sentences' real tokens",
}


def perplexity(lm: LoadedModel, sentences: list[tuple[str, str]], max_length: int) -> float:
    """exp of the mean next-token cross-entropy over the sentences' real tokens."""
    nll, count = 0.0, 0
    with torch.inference_mode():
        for batch in iter_batches(sentences, lm.tokenizer, PPL_BATCH_TOKENS, max_length):
            ids, mask = batch.input_ids.to(lm.device), batch.attention_mask.to(lm.device)
            logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nll += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                   reduction="sum").item()
            count += int((labels != -100).sum())
    return math.exp(nll / count) if count else math.nan


def compare(before: dict[str, dict], after: dict[str, dict], layers: list[int], targets: list[str]) -> dict:
    """Per language: A before/after, gain and retention per layer and their summaries, perplexities."""
    languages = {}
    for lang in before:
        a0, a1 = before[lang]["A"], after[lang]["A"]
        gain = {layer: 100.0 * (a1[layer] - a0[layer]) / a0[layer] if a0[layer] else math.nan for layer in layers}
        retention = {layer: 100.0 * a1[layer] / a0[layer] if a0[layer] else math.nan for layer in layers}
        languages[lang] = {
            "role": "target" if lang in targets else "reference" if lang == REFERENCE else "other",
            "A_before": a0, "A_after": a1, "gain_pct": gain, "retention_pct": retention,
            "gain_pct_mean": mean(gain.values()), "retention_pct_mean": mean(retention.values()),
            "gain_pct_median": median(gain.values()), "gain_pct_pooled": pooled_gain(a0, a1, layers),
            "ppl_before": before[lang]["ppl"], "ppl_after": after[lang]["ppl"],
        }
    english = languages.get(REFERENCE, {})
    return {"targets": targets, "layers": layers, "languages": languages,
            "english_retention_pct": english.get("retention_pct_mean", math.nan)}


def _finite(values: Iterable) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def mean(values: Iterable) -> float:
    """Mean of the finite values (NaN when there are none)."""
    finite = _finite(values)
    return float(np.mean(finite)) if finite else math.nan


def median(values: Iterable) -> float:
    finite = _finite(values)
    return float(np.median(finite)) if finite else math.nan


def pooled_gain(before: dict, after: dict, layers: list[int]) -> float:
    """Gain of the layer-summed A: robust to layers whose A_before is near zero."""
    total = sum(before[layer] for layer in layers)
    return 100.0 * (sum(after[layer] for layer in layers) - total) / total if total else math.nan
