"""Bits per byte on held-out parallel sentences: language-modelling quality that no tokenizer flatters.

The sentences are the run's corpus (``run.corpus``, its first ``run.max_sentences`` ids when set) at the
ids that alignment holds out (`toolkit.align.split_ids` with ``align.heldout``, ``align.val_fraction``
and ``run.seed``: the very ids its before/after measurement uses, never trained on by an adapter;
`toolkit.corpus.is_heldout` is the SAEs' split, and adapters do train on those sentences), the first
``eval.bpb_sentences`` of them, the same ids in every language, so every language scores the same
content. Each sentence goes through the lm-eval model's ``loglikelihood_rolling`` (HFLM's rolling
windows); bits per byte is lm-eval's ``bits_per_byte`` aggregation: -sum(log-likelihood) / (ln 2 *
sum(UTF-8 bytes)). Per sentence, bits per byte gives a mean and standard error and the paired
base-vs-adapter comparison.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from toolkit import corpus
from toolkit.evaluation import metrics


def heldout_texts(spec: str, langs: list[str], limit: int, heldout: float, val_fraction: float, seed: int,
                  max_sentences: int = 0) -> tuple[list[str], dict[str, list[str]]]:
    """The first `limit` ids that alignment holds out of the run's corpus, and their sentence per language."""
    from toolkit.align.data import split_ids

    c = corpus.load(spec, langs, max_sentences)
    held = set(split_ids(c.ids, heldout, val_fraction, seed).heldout)
    rows = [i for i, sid in enumerate(c.ids) if sid in held][:limit]
    return [c.ids[i] for i in rows], {lang: [c.texts[lang][i] for i in rows] for lang in c.langs}


def score(lm, ids: list[str], texts: list[str]) -> dict[str, Any]:
    """Bits per byte of one language's sentences: the aggregate, the per-sentence values and their mean ± SE."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.metrics import bits_per_byte

    requests = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(texts)]
    lls = lm.loglikelihood_rolling(requests)
    sizes = [len(text.encode("utf-8")) for text in texts]
    per_sentence = [-ll / (np.log(2) * n) for ll, n in zip(lls, sizes, strict=True)]
    mean, se = metrics.mean_se(np.array(per_sentence))
    return {"n": len(texts), "bytes": int(sum(sizes)), "bpb": float(bits_per_byte(list(zip(lls, sizes, strict=True)))),
            "bpb_sentence": mean, "bpb_sentence_stderr": se,
            "sentences": dict(zip(ids, (float(v) for v in per_sentence), strict=True))}


def compare(model: str, lang: str, base: dict, adapted: dict, seed: int = 0) -> dict | None:
    """adapted - base per-sentence bits per byte on the sentences both scored (negative: better)."""
    keys = sorted(set(base["sentences"]) & set(adapted["sentences"]))
    if not keys:
        return None
    c = metrics.paired_continuous(np.array([base["sentences"][k] for k in keys]),
                                  np.array([adapted["sentences"][k] for k in keys]), seed=seed)
    return {"model": model, "language": lang, "n_paired": c["n"], "base_bpb": base["bpb"], "bpb": adapted["bpb"],
            "delta_bpb": c["delta"], "delta_bpb_ci_low": c["ci_low"], "delta_bpb_ci_high": c["ci_high"],
            "p_bpb": c["p"]}
