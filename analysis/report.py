"""The result of a gap analysis (GapReport) and its JSON and CSV forms."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from analysis.instrument import InstrumentPanel
from analysis.stats import CI_LEVEL, nanmean
from toolkit import files

GROUP_NAME = "medium/low-resource"

# How each number is made; stored in gaps.json so a reader of the file needs nothing else.
METHODS = {
    "value": "A(L,l): mean over L's sentences of the per-sentence statistic (layers/{l}/stats/{stat}).",
    "ci": "95 % percentile bootstrap over sentence ids: each replicate draws the union of all languages' "
    "sentence ids with replacement once and reuses the draw for every language and layer, so a language "
    "and the reference are resampled together (paired) on their parallel sentences, and band and group "
    "statistics are resampled jointly across layers and languages.",
    "gap_pct": "100 * (A(L,l) - A(ref,l)) / A(ref,l) on all sentences; negative = weaker than the reference. "
    "gap_ci_low/high: the same statistic in each bootstrap replicate.",
    "gap_parallel_pct": "the gap restricted to sentences present in both L and the reference (matched by id).",
    "p_value": "two-sided Wilcoxon signed-rank test of the paired per-sentence values (L vs reference) on "
    "the parallel sentences; equals scipy.stats.wilcoxon with its defaults (zeros dropped, average ranks "
    "for ties, exact distribution for n <= 50 without ties or zeros, exact sign-flip enumeration for "
    "n <= 13 otherwise, else the tie-corrected normal approximation without continuity correction).",
    "headlines": "early_min_gap: most negative gap among early-band layers (and its layer); deep_mean_gap: "
    "mean gap over deep-band layers. For a group, the per-layer gap is the unweighted mean over its "
    "languages. CIs: the same statistic (min or mean over the band) computed in each bootstrap replicate.",
    "overlap": "per layer, over the parallel sentences: jaccard = |F_L ∩ F_ref| / |F_L ∪ F_ref| with F the "
    "features active (> 0) in any token of any parallel sentence; sentence_jaccard = mean over sentence "
    "pairs of the same ratio per pair (pairs with no active feature on either side left out).",
    "similarity": "per layer, mean over parallel sentence pairs of the cosine similarity of the mean-pooled "
    "residual stream (only where dense residuals were saved).",
    "instrument": "the SAE gap beside its controls, per language (and group) and band: the band gap (mean over "
    "the band's layers) under the SAE statistic, l0, resid_norm (mean per-token L2 norm of the residual stream, "
    "no SAE involved) and position-matched (the SAE statistic's token mass over positions 1..K of each parallel "
    "pair, K the shorter sentence's token count), each with the bootstrap CI above. agrees: same sign as the SAE "
    "gap and both CIs exclude 0; disagrees: opposite signs, both exclude 0; unclear otherwise. fidelity: per "
    "language and layer, FVE = 1 - sum |x - x_hat|^2 / sum |x - x_bar|^2 over the language's held-out sentences "
    "(x_bar: the mean activation recorded with the SAE), dead_frac / dense_frac: features firing on none / more "
    "than 10 % of the language's tokens.",
}


@dataclass
class GapRow:
    """One language at one layer. The fields, in order, are the columns of gaps.csv."""

    language: str
    layer: int
    statistic: str
    value: float
    ci_low: float
    ci_high: float
    gap_pct: float
    gap_parallel_pct: float
    p_value: float
    n: int
    gap_ci_low: float
    gap_ci_high: float
    n_parallel: int


@dataclass
class Headline:
    """The paper's two numbers for one language or one group, with bootstrap CIs."""

    name: str
    languages: list[str]
    early_min_gap: float
    early_min_layer: int | None
    early_ci: tuple[float, float]
    deep_mean_gap: float
    deep_ci: tuple[float, float]


@dataclass
class OverlapRow:
    language: str
    layer: int
    jaccard: float
    sentence_jaccard: float
    n_parallel: int


@dataclass
class SimilarityRow:
    language: str
    layer: int
    cosine: float
    n_parallel: int


@dataclass
class GapReport:
    statistic: str
    reference: str
    languages: list[str]  # reference first, then the others, the medium/low-resource group last
    low_langs: list[str]  # the members of the headline group that are present
    layers: list[int]
    bands: dict[str, list[int]]
    n_boot: int
    seed: int
    rows: list[GapRow]
    headlines: list[Headline]
    overlap: list[OverlapRow] = field(default_factory=list)
    similarity: list[SimilarityRow] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # model, SAEs and provenance of the files
    sources: dict[str, list[str]] = field(default_factory=dict)  # language -> files
    notes: list[str] = field(default_factory=list)
    instrument: InstrumentPanel | None = None  # the SAE gap beside its controls and the SAE's fidelity

    @property
    def others(self) -> list[str]:
        """The languages compared with the reference."""
        return [lang for lang in self.languages if lang != self.reference]

    def matrix(self, name: str, languages: list[str] | None = None) -> np.ndarray:
        """(languages, layers) array of a GapRow field, e.g. "gap_pct"; NaN where missing."""
        return _matrix(self.rows, name, languages or self.languages, self.layers)

    def group_gap(self) -> np.ndarray:
        """Per-layer gap of the medium/low-resource group: the unweighted mean over its languages."""
        return nanmean(self.matrix("gap_pct", self.low_langs), axis=0)

    def overlap_matrix(self, name: str = "jaccard") -> np.ndarray:
        """(others, layers) array of an OverlapRow field."""
        return _matrix(self.overlap, name, self.others, self.layers)

    def headline(self, name: str) -> Headline | None:
        return next((h for h in self.headlines if h.name == name), None)

    def to_json(self) -> dict:
        meta = {
            "statistic": self.statistic,
            "reference": self.reference,
            "languages": self.languages,
            "low_langs": self.low_langs,
            "layers": self.layers,
            "bands": self.bands,
            "n_boot": self.n_boot,
            "seed": self.seed,
            "ci_level": CI_LEVEL,
            "model": self.meta,
            "sources": self.sources,
            "methods": METHODS,
        }
        rows = {k: [dataclasses.asdict(r) for r in getattr(self, k)] for k in ("rows", "overlap", "similarity")}
        body = {"format": "lingogap-gaps", "version": 2, "metadata": meta, **rows,
                "headlines": [dataclasses.asdict(h) for h in self.headlines], "notes": self.notes,
                "instrument": dataclasses.asdict(self.instrument) if self.instrument else None}
        return files.jsonable(body)


def write_json(report: GapReport, path: Path) -> None:
    files.write_json(path, report.to_json())


def write_csv(report: GapReport, path: Path) -> None:
    columns = [f.name for f in dataclasses.fields(GapRow)]
    rows = (["" if _missing(v) else v for v in (getattr(row, c) for c in columns)] for row in report.rows)
    files.write_csv(path, columns, rows)


def _matrix(rows: list, name: str, languages: list[str], layers: list[int]) -> np.ndarray:
    out = np.full((len(languages), len(layers)), np.nan)
    li, yi = {lang: i for i, lang in enumerate(languages)}, {layer: j for j, layer in enumerate(layers)}
    for r in rows:
        if r.language in li:
            out[li[r.language], yi[r.layer]] = getattr(r, name)
    return out


def _missing(value) -> bool:
    return isinstance(value, float) and not math.isfinite(value)
