"""Synthetic activation files for the analysis tests, written through toolkit.store.ActivationWriter."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from toolkit.store import CONTROLS, FIDELITY_SUMS, ActivationWriter, Batch, LayerBatch

MODEL = "test/tiny-model"
SAE_SOURCE = "test-saes"


def write_activations(
    path: Path,
    language: str,
    ids: Sequence[str],
    stats: np.ndarray | dict[str, np.ndarray],
    *,
    layers: Sequence[int] | None = None,
    features: dict[int, list[list[list[int]]]] | None = None,
    resid: np.ndarray | None = None,
    n_tokens: int = 2,
    batch_size: int = 4,
    shard: tuple[int, int] = (0, 1),
    **identity,
) -> Path:
    """Write one finished activation file with known per-sentence statistics.

    stats: (S, n_layers) values stored as mass, l0 and max alike, or {"mass": ..., "l0": ..., "max": ...}, plus
      optionally the controls and fidelity sums of layout 2 ("resid_norm", "recon_err", "sq_err", "sq_dev").
    features: per layer, per sentence, per token, its codes: feature ids (value 1.0) or (feature, value);
      by default token t at layer l has the single feature (crc32(sentence id) + t + l) % 7.
    resid: (S, n_layers, d) mean-pooled residuals; every token of a sentence gets that vector.
    identity: overrides of the identity attributes (model_id, sae_source, sae_ids, ...).
    """
    stats = stats if isinstance(stats, dict) else {"mass": stats, "l0": stats, "max": stats}
    stats = {k: np.asarray(v, dtype=np.float64) for k, v in stats.items()}
    n_sentences, n_layers = stats["mass"].shape
    layers = list(range(n_layers)) if layers is None else list(layers)
    assert len(layers) == n_layers and len(ids) == n_sentences
    ident = {
        "language": language,
        "model_id": MODEL,
        "layers": layers,
        "sae_source": SAE_SOURCE,
        "sae_ids": [f"layer_{x}" for x in layers],
        "corpus_hash": "c0ffee",
        "shard": shard[0],
        "n_shards": shard[1],
        "d_sae": [7] * len(layers),
        **identity,
    }
    writer = ActivationWriter(path, ident, layers, code_dtype="float32", overwrite=True)
    for start in range(0, n_sentences, batch_size):
        rows = range(start, min(start + batch_size, n_sentences))
        lengths = np.full(len(rows), n_tokens)
        batch = Batch(
            sentence_ids=[ids[i] for i in rows],
            lengths=lengths,
            token_ids=np.arange(lengths.sum(), dtype=np.int32),
            positions=np.tile(np.arange(1, n_tokens + 1, dtype=np.int32), len(rows)),
        )
        for j, layer in enumerate(layers):
            token_codes = [
                [c if isinstance(c, tuple) else (c, 1.0) for c in features[layer][i][t]]
                if features is not None
                else [((zlib.crc32(ids[i].encode()) + t + layer) % 7, 1.0)]
                for i in rows
                for t in range(n_tokens)
            ]
            counts = [len(codes) for codes in token_codes]
            batch.layers[layer] = LayerBatch(
                indptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                indices=np.array([f for codes in token_codes for f, _ in codes], dtype=np.int32),
                values=np.array([v for codes in token_codes for _, v in codes], dtype=np.float32),
                mass=stats["mass"][list(rows), j],
                l0=stats.get("l0", stats["mass"])[list(rows), j],
                max=stats.get("max", stats["mass"])[list(rows), j],
                resid=None if resid is None else np.repeat(resid[list(rows), j], n_tokens, axis=0),
                **{k: stats[k][list(rows), j] for k in CONTROLS + FIDELITY_SUMS if k in stats},
            )
        writer.write_batch(batch)
    return writer.finalize(attrs={"preset": "test", "corpus_name": "synthetic"})


def constant_run(
    run: Path, values: dict[str, Sequence[float]], n_sentences: int = 6, ids: Sequence[str] | None = None
) -> Path:
    """A run directory whose languages have, at each layer, the same value for every sentence."""
    ids = list(ids or [f"s{i:03d}" for i in range(n_sentences)])
    for lang, per_layer in values.items():
        stats = np.tile(np.asarray(per_layer, dtype=np.float64), (len(ids), 1))
        write_activations(run / "activations" / f"{lang}.h5", lang, ids, stats)
    return run


def random_run(
    run: Path, languages: Sequence[str], n_sentences: int = 24, n_layers: int = 6, seed: int = 0,
    scale: dict[str, float] | None = None,
) -> Path:
    """A run with noisy per-sentence values; language L's values are scaled by scale[L] (default 1)."""
    rng = np.random.default_rng(seed)
    ids = [f"s{i:03d}" for i in range(n_sentences)]
    base = rng.gamma(4.0, 2.0, size=(n_sentences, n_layers))
    for lang in languages:
        noise = rng.normal(1.0, 0.1, size=base.shape)
        stats = base * noise * (scale or {}).get(lang, 1.0)
        write_activations(run / "activations" / f"{lang}.h5", lang, ids, stats)
    return run
