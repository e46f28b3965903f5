"""Activation files in, one merged view per language out.

Resolves paths (files or run directories), merges the shards and runs of one language, and refuses
files that were not made by the same model with the same SAEs at the same layers. Each language's
sentences are held in one canonical order, sorted by sentence id, so every number downstream is
independent of shard layout and processing order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.errors import UserError
from toolkit.rundir import RunDir
from toolkit.store import ActivationFile, activation_files

# Attributes that must agree across all files analysed together, checked in this order.
MATCHING_ATTRS = ("model_id", "model_revision", "adapter", "layers", "hook_point", "sae_source", "sae_ids")
# Provenance copied from the reference's first file into the report.
META_ATTRS = ("preset", "corpus_name", "d_model", "d_sae", "compute_dtype", "code_dtype", "lingogap_version")


@dataclass
class Shard:
    path: Path
    rows: np.ndarray  # canonical row of each of the file's sentences, in file order


@dataclass
class LanguageSource:
    """All sentences of one language, possibly spread over several files."""

    language: str
    ids: np.ndarray  # sorted, unique sentence ids: the canonical row order
    shards: list[Shard]

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self.shards]

    def stats(self, layers: Sequence[int], stat: str) -> np.ndarray:
        """(n, len(layers)) per-sentence statistic, canonical rows."""
        out = np.empty((self.n, len(layers)))
        for shard in self.shards:
            with ActivationFile(shard.path) as f:
                for j, layer in enumerate(layers):
                    out[shard.rows, j] = f.stats(layer, stat)
        return out

    def codes(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every SAE code of `layer` as (canonical sentence row, feature index, value) triples."""
        rows, indices, values = [], [], []
        for shard in self.shards:
            with ActivationFile(shard.path) as f:
                offsets = f.token_offsets
                indptr, idx, val = f.codes(layer)
            token_rows = np.repeat(shard.rows, np.diff(offsets))
            rows.append(np.repeat(token_rows, np.diff(indptr)))
            indices.append(idx)
            values.append(val)
        return np.concatenate(rows), np.concatenate(indices), np.concatenate(values)

    def fidelity_sums(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(n,) per-sentence sums of |x - x_hat|^2 and |x - x_bar|^2 at `layer`, canonical rows (layout 2)."""
        err, dev = np.empty(self.n), np.empty(self.n)
        for shard in self.shards:
            with ActivationFile(shard.path) as f:
                err[shard.rows], dev[shard.rows] = f.stats(layer, "sq_err"), f.stats(layer, "sq_dev")
        return err, dev

    def offsets(self) -> np.ndarray:
        """(n+1,) token offsets of the canonical sentence order, as `token_values` arranges tokens."""
        lengths = np.empty(self.n, dtype=np.int64)
        for shard in self.shards:
            lengths[shard.rows] = np.diff(_with_file(shard.path, lambda f: f.token_offsets))
        return np.concatenate([[0], np.cumsum(lengths)])

    def token_mass(self, layer: int) -> np.ndarray:
        """(T,) summed SAE activation of every token at `layer`, sentences in canonical order."""
        parts: list[tuple[int, np.ndarray]] = []
        for shard in self.shards:
            with ActivationFile(shard.path) as f:
                offsets = f.token_offsets
                indptr, _, values = f.codes(layer)
            n_tok = len(indptr) - 1
            per_token = np.bincount(np.repeat(np.arange(n_tok), np.diff(indptr)), weights=values, minlength=n_tok)
            parts += [(int(row), per_token[offsets[i]:offsets[i + 1]]) for i, row in enumerate(shard.rows)]
        parts.sort(key=lambda p: p[0])
        return np.concatenate([p[1] for p in parts]) if parts else np.zeros(0)

    def feature_counts(self, layer: int) -> tuple[np.ndarray, int]:
        """How many of the language's tokens each SAE feature fires on at `layer`, and the token count."""
        counts, n_tokens = None, 0
        for shard in self.shards:
            with ActivationFile(shard.path) as f:
                width = int(np.asarray(f.attrs["d_sae"])[f.layers.index(layer)])
                indptr, indices, _ = f.codes(layer)
            part = np.bincount(indices, minlength=width)
            counts = part if counts is None else counts + part
            n_tokens += len(indptr) - 1
        return counts, n_tokens

    def has_resid(self, layer: int) -> bool:
        return all(_with_file(s.path, lambda f: f.has_resid(layer)) for s in self.shards)

    def pooled_resid(self, layer: int) -> np.ndarray:
        """(n, d_model) mean-pooled residual stream per sentence, canonical rows."""
        pooled = None
        for shard in self.shards:
            part = _with_file(shard.path, lambda f: f.pooled_resid(layer))
            if pooled is None:
                pooled = np.empty((self.n, part.shape[1]))
            pooled[shard.rows] = part
        return pooled


def resolve_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Activation files named by `paths`: .h5 files, run directories (RUN/activations/*.h5) or
    folders of .h5 files. Each file once, in the order given."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            files = [f for group in activation_files(path).values() for f in group] or sorted(path.glob("*.h5"))
            if not files:
                raise UserError(f"{path}: no activation files (*.h5) in {RunDir(path).activations} or {path}")
            found.extend(files)
        else:
            raise UserError(f"{path}: no such file or directory")
    seen: set[Path] = set()
    unique = []
    for path in found:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique


def load_sources(paths: Sequence[Path], reference: str) -> tuple[dict[str, LanguageSource], dict]:
    """Open every file, check that they belong together, merge by language.

    Returns the sources by language and the run metadata (model, SAEs, layers, provenance).
    """
    if not paths:
        raise UserError("no activation files given")
    signatures: list[tuple[Path, dict]] = []
    per_language: dict[str, list[tuple[Path, list[str]]]] = {}
    attrs_by_path: dict[Path, dict] = {}
    for path in paths:
        with ActivationFile(path) as f:
            attrs = f.attrs
            signature = _signature(f)
            language = str(attrs.get("language") or path.name.split(".")[0])
            ids = f.sentence_ids
        if not ids:
            raise UserError(f"{path} holds no sentences; delete it or run extract again")
        if signatures:
            _check_same(signatures[0], (path, signature))
        signatures.append((path, signature))
        attrs_by_path[path] = attrs
        per_language.setdefault(language, []).append((path, ids))

    if reference not in per_language:
        raise UserError(
            f"no activation file for the reference language {reference!r} (found: {', '.join(sorted(per_language))}); "
            f"every gap is measured against {reference!r}, so extract it too or pass its file"
        )
    sources = {lang: _merge(lang, files) for lang, files in per_language.items()}
    ref_attrs = attrs_by_path[sources[reference].paths[0]]
    meta = {**signatures[0][1], **{k: _plain(ref_attrs[k]) for k in META_ATTRS if k in ref_attrs}}
    return sources, meta


def check_parallel(sources: dict[str, LanguageSource], reference: str) -> None:
    """Every language holds exactly the reference's sentence ids. A corpus changed after extraction (ids
    added, removed or renamed in one language) changes the pairing every gap rests on: refused, naming the
    languages and ids, unless the caller asks for the ids they share."""
    ref = sources[reference]
    for lang in sorted(sources):
        only_here, only_ref = np.setdiff1d(sources[lang].ids, ref.ids), np.setdiff1d(ref.ids, sources[lang].ids)
        if lang == reference or not (only_here.size or only_ref.size):
            continue
        raise UserError(
            f"{lang} and {reference} do not hold the same sentence ids ({_some(only_here)} only in {lang}; "
            f"{_some(only_ref)} only in {reference}): was the corpus changed after extraction? Rerun extract with "
            f"--overwrite on one corpus, or pass --allow-id-mismatch to analyse only the ids both hold"
        )


def _some(ids: np.ndarray, shown: int = 3) -> str:
    if not ids.size:
        return "none"
    names = ", ".join(repr(str(i)) for i in ids[:shown])
    return f"{ids.size}: {names}" + (", ..." if ids.size > shown else "")


def _merge(language: str, files: list[tuple[Path, list[str]]]) -> LanguageSource:
    all_ids = np.array([i for _, ids in files for i in ids], dtype=str)
    order = np.argsort(all_ids, kind="stable")
    canonical = all_ids[order]
    dup = np.flatnonzero(canonical[1:] == canonical[:-1])
    if dup.size:
        first = str(canonical[dup[0]])
        holders = [str(path) for path, ids in files if first in ids]
        where = f"in {holders[0]} twice" if len(holders) == 1 else f"in {' and '.join(holders)}"
        raise UserError(
            f"language {language!r}: sentence id {first!r} appears {where} ({dup.size} duplicate id(s) in all); "
            "shards and runs of one language must not overlap — remove the stale file"
        )
    rows = np.empty(len(all_ids), dtype=np.int64)
    rows[order] = np.arange(len(all_ids))
    shards, start = [], 0
    for path, ids in files:
        shards.append(Shard(path, rows[start : start + len(ids)]))
        start += len(ids)
    return LanguageSource(language, canonical, shards)


def _signature(f: ActivationFile) -> dict:
    identity, attrs = f.identity, f.attrs
    signature = {k: _plain(identity[k] if k in identity else attrs.get(k)) for k in MATCHING_ATTRS}
    signature["layers"] = f.layers  # the layers actually stored
    return signature


def _check_same(first: tuple[Path, dict], other: tuple[Path, dict]) -> None:
    (path_a, sig_a), (path_b, sig_b) = first, other
    for key in MATCHING_ATTRS:
        if sig_a.get(key) != sig_b.get(key):
            raise UserError(
                f"{path_a} and {path_b} cannot be analysed together: their {key} differs "
                f"({sig_a.get(key)!r} vs {sig_b.get(key)!r}); analyse files of one model with one set of SAEs "
                "at the same layers"
            )


def _plain(value):
    """Attribute value as plain Python: JSON strings decoded, numpy scalars unwrapped, '' as None."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, str):
        if value == "":
            return None
        if value[:1] in "[{":
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value
    return value


def _with_file(path: Path, read):
    with ActivationFile(path) as f:
        return read(f)
