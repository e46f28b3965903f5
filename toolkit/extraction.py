"""The measurement core: residual stream of every selected layer -> per-layer SAE codes -> HDF5, resumable.

One extraction unit is one language (or one shard of it). The caller loads the model and the SAEs
once and extracts any number of units with them; progress is reported through a callback, so this
module prints nothing (`jobs/extract.py` draws the bars and the summary table).
"""

from __future__ import annotations

import ctypes
import functools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from toolkit import __version__, models
from toolkit.capture import HOOK_TEMPLATE, ResidualCapture, TokenBatch, count_truncated, iter_batches
from toolkit.config import ExtractConfig
from toolkit.corpus import Corpus
from toolkit.errors import UserError
from toolkit.sae_set import LayerSAE, SAESet
from toolkit.store import ActivationFile, ActivationWriter, Batch, LayerBatch, portable, shard_name

# advance(sentences done in this batch, tokens per second so far)
Advance = Callable[[int, float], None]
# progress(lang, total sentences, sentences already committed) -> a context yielding `advance`;
# entered only when a unit has batches left to compute.
ProgressFactory = Callable[[str, int, int], AbstractContextManager[Advance]]


@dataclass(frozen=True)
class Extraction:
    """How and where units are extracted: the `extract` options, the folder the files go to (a run's
    `RunDir.activations`), and what the files record of the run (its preset, the adapter applied to the model)."""

    options: ExtractConfig
    folder: Path
    preset: str
    adapter: str = ""

    def path(self, unit: ExtractionUnit) -> Path:
        return self.folder / shard_name(unit.lang, unit.shard, unit.n_shards)


@dataclass
class ExtractionUnit:
    lang: str
    shard: int = 0
    n_shards: int = 1


@dataclass
class Summary:
    lang: str
    sentences: int
    tokens: int
    seconds: float
    path: Path
    mean_l0: float
    skipped: bool = False
    truncated: int | None = None  # sentences cut at max_length (None: a file from before it was counted)


def all_units(langs: list[str], shards: int) -> list[ExtractionUnit]:
    """Every language and shard (`extract.shards`) of a run."""
    return [ExtractionUnit(lang, k, shards) for lang in langs for k in range(shards)]


def fixed_mmap_threshold(size: int = 4 << 20, keep: int = 64 << 20) -> bool:
    """Give buffers of `size` bytes and more back to the OS when freed, and keep up to `keep` bytes of free heap
    for the next allocations (glibc; a no-op elsewhere).

    glibc raises its mmap threshold as large blocks are freed (up to 32 MiB), after which tensors of
    varying batch shapes come from a heap that fragments: peak RSS grew 1.37x from 1x to 16x the corpus
    at 256-token batches, 1.07x with this fix. 256 KiB instead cost 20 % of throughput in page faults
    for no lower peak (docs/performance.md). Fixing the mmap threshold also fixes the trim threshold at
    its 128 KiB default, so every SAE training step and decoder layer gave its smaller tensors back to the
    OS and faulted them in again: 460k page faults per trained layer (1 s of system time) and 2.7x the
    forward pass's faults, against a few thousand with `keep` (measured on the embedded model).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(-3, size)) and bool(libc.mallopt(-1, keep))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


def shard_ids(ids: list[str], shard: int, n_shards: int) -> list[str]:
    """Contiguous blocks of ids, so shard files of one language concatenate in corpus order."""
    bounds = np.linspace(0, len(ids), n_shards + 1).round().astype(int)
    return ids[bounds[shard] : bounds[shard + 1]]


def base_identity(
    job: Extraction, lm: models.LoadedModel, corpus: Corpus, unit: ExtractionUnit, layers: list[int]
) -> dict:
    """The identity known before any SAE is loaded or trained: a mismatch there is refused first."""
    opts = job.options
    return {
        "language": unit.lang,
        "shard": unit.shard,
        "n_shards": unit.n_shards,
        "corpus_name": corpus.name,
        "corpus_hash": corpus.lang_hash(unit.lang),
        "n_corpus": len(corpus.ids),
        "model_id": lm.model_id,
        "model_revision": lm.revision,
        "preset": job.preset,
        "adapter": job.adapter,
        "compute_dtype": str(lm.dtype).removeprefix("torch."),
        "d_model": lm.d_model,
        "layers": layers,
        "hook_point": HOOK_TEMPLATE,
        "code_dtype": opts.code_dtype,
        "max_length": opts.max_length,
        "batch_tokens": opts.batch_tokens,
        "save_resid": opts.save_resid,
    }


def identity(
    job: Extraction, lm: models.LoadedModel, saes: SAESet, corpus: Corpus, unit: ExtractionUnit, layers: list[int]
) -> dict:
    """What makes a file this extraction's: a writer refuses to resume a file with another identity.

    It holds what determines the numbers, never where the run folder lives (a copied run resumes).
    """
    return portable(
        {
            **base_identity(job, lm, corpus, unit, layers),
            "sae_source": saes.source,
            "sae_ids": saes.ids,
            "d_sae": [saes.layers[i].d_sae for i in layers],
        }
    )


@contextmanager
def no_progress(lang: str, total: int, completed: int) -> Iterator[Advance]:
    yield lambda sentences, rate: None


def extract_unit(
    job: Extraction,
    lm: models.LoadedModel,
    saes: SAESet,
    corpus: Corpus,
    unit: ExtractionUnit,
    layers: list[int],
    progress: ProgressFactory = no_progress,
) -> Summary:
    """Extract one unit into `job.folder`, resuming from its committed parts; skip a finished file."""
    path = job.path(unit)
    with ActivationWriter(
        path,
        identity(job, lm, saes, corpus, unit, layers),
        layers,
        job.options.code_dtype,
        overwrite=job.options.overwrite,
    ) as writer:
        if writer.complete:  # and read back once: a damaged file is refused with the fix
            return summary_of(path, skipped=True)
        sentences = unit_sentences(corpus, unit)
        return _extract_into(writer, job.options, lm, saes, sentences, layers, functools.partial(progress, unit.lang))


def unit_sentences(corpus: Corpus, unit: ExtractionUnit) -> list[tuple[str, str]]:
    return corpus.subset(shard_ids(corpus.ids, unit.shard, unit.n_shards)).sentences(unit.lang)


def unit_batches(job: Extraction, lm: models.LoadedModel, corpus: Corpus, unit: ExtractionUnit) -> list[TokenBatch]:
    """The unit's batch plan: it depends only on the text and the options, so a resumed run makes the same."""
    return batch_plan(unit_sentences(corpus, unit), lm.tokenizer, job.options)


def batch_plan(sentences: list[tuple[str, str]], tokenizer, opts: ExtractConfig) -> list[TokenBatch]:
    return list(iter_batches(sentences, tokenizer, opts.batch_tokens, opts.max_length))


def _extract_into(
    writer: ActivationWriter,
    opts: ExtractConfig,
    lm: models.LoadedModel,
    saes: SAESet,
    sentences: list[tuple[str, str]],
    layers: list[int],
    progress: Callable[[int, int], AbstractContextManager[Advance]],
) -> Summary:
    """Encode the sentences' batches not yet committed to `writer`, then finalize it with the set's record."""
    # The plan depends only on the text and the config, so a resumed run skips exactly the batches
    # already committed and its file equals an uninterrupted run's.
    batches = batch_plan(sentences, lm.tokenizer, opts)
    committed = writer.n_parts
    done_ids = [sid for b in batches[:committed] for sid in b.sentence_ids]
    if set(done_ids) != writer.done_sentence_ids():
        raise UserError(f"{writer.parts} does not match the current batch plan; rerun with --overwrite")
    truncated = count_truncated(lm.tokenizer, [text for _, text in sentences], opts.max_length)
    started = time.perf_counter()
    n_tokens = sum(b.n_real - len(b.sentence_ids) for b in batches[committed:])
    with progress(len(sentences), len(done_ids)) as advance:
        last = _encode_and_write(lm, saes, batches[committed:], layers, opts.save_resid, writer, advance)
    seconds = time.perf_counter() - started
    writer.finalize(
        {
            "lingogap_version": __version__,
            "seconds": seconds,
            "sae_quality": saes.quality(),
            "tokens_per_second": n_tokens / max(seconds, 1e-9),
            "n_truncated": truncated,
            "sae_recipe": saes.recipe,
        },
        {
            i: {
                "sae_id": saes.layers[i].sae_id,
                "d_sae": saes.layers[i].d_sae,
                "fve": saes.layers[i].fve,
                "l0": saes.layers[i].l0,
                "mean_source": saes.layers[i].mean_source,
            }
            for i in layers
        },
        last=last,
    )
    return summary_of(writer.path, seconds=seconds)


def _encode_and_write(
    lm: models.LoadedModel,
    saes: SAESet,
    batches: list[TokenBatch],
    layers: list[int],
    save_resid: bool,
    writer: ActivationWriter,
    advance: Advance,
) -> Batch | None:
    """Encode `batches` and commit each as a part but the last, which is returned for `finalize` to take from memory."""
    started = time.perf_counter()  # for the rate `advance` reports
    # Batch k is written (and fsynced) by one I/O thread while batch k+1 is computed; parts stay in order.
    last = None
    with ThreadPoolExecutor(1, thread_name_prefix="hdf5-parts") as io:
        done_tokens = 0
        writing = None
        for k, batch in enumerate(batches):
            encoded = encode_batch(lm, saes, batch, layers, save_resid)
            if writing is not None:
                writing.result()
            if k == len(batches) - 1:
                last = encoded
            else:
                writing = io.submit(writer.write_batch, encoded)
            done_tokens += batch.n_real - len(batch.sentence_ids)
            advance(len(batch.sentence_ids), done_tokens / max(time.perf_counter() - started, 1e-9))
    return last


def encode_batch(lm: models.LoadedModel, saes: SAESet, batch: TokenBatch, layers: list[int], save_resid: bool) -> Batch:
    """One forward pass; each layer's residual is encoded by its SAE inside the hook and dropped."""
    keep = batch.keep
    lengths = keep.sum(1)
    # sentence index of every kept token (boolean indexing keeps row-major order)
    owner = torch.arange(len(lengths)).repeat_interleave(lengths).to(lm.device)
    n_sent = len(lengths)
    out = Batch(
        sentence_ids=batch.sentence_ids,
        lengths=lengths.numpy(),
        token_ids=batch.input_ids[keep].numpy(),
        positions=torch.arange(batch.input_ids.shape[1]).expand_as(keep)[keep].numpy(),
    )
    keep_dev = keep.to(lm.device)
    per_sentence = lengths.to(lm.device, torch.float32)

    def per_sentence_sum(values: torch.Tensor, who: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_sent, device=values.device).index_add_(0, who, values)

    def sink(layer: int, hidden: torch.Tensor) -> None:
        x = hidden[keep_dev]
        layer_sae = saes.layers[layer]
        rows, cols, values = layer_sae.encode_sparse(x)
        values = values.float()  # the statistics come from the few nonzero entries
        who = owner[rows]
        mass = per_sentence_sum(values, who) / per_sentence
        l0 = torch.bincount(who, minlength=n_sent) / per_sentence
        peak = torch.zeros(n_sent, device=values.device).scatter_reduce_(0, who, values, "amax", include_self=False)
        indptr = torch.zeros(len(x) + 1, dtype=torch.long)
        indptr[1:] = torch.bincount(rows.cpu(), minlength=len(x)).cumsum(0)
        measured = controls(layer_sae, x, rows, cols, values)
        sums = {k: per_sentence_sum(v, owner) for k, v in measured.items()}
        out.layers[layer] = LayerBatch(
            indptr=indptr.numpy(),
            indices=cols.cpu().numpy(),
            values=values.cpu().numpy(),
            mass=mass.cpu().numpy(),
            l0=l0.cpu().numpy(),
            max=peak.cpu().numpy(),
            resid=x.float().cpu().numpy() if save_resid else None,
            resid_norm=(sums["norm"] / per_sentence).cpu().numpy(),
            recon_err=(sums["ratio"] / per_sentence).cpu().numpy(),
            sq_err=sums["err"].cpu().numpy(),
            sq_dev=sums["dev"].cpu().numpy(),
        )

    with torch.inference_mode(), ResidualCapture(lm, layers, sink) as cap:
        cap.run(batch)
    return out


def controls(
    layer_sae: LayerSAE, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-token SAE-free control and SAE error: |x|, |x - x_hat|^2, |x - x_bar|^2 and their ratio (1 - FVE)."""
    if layer_sae.mean is None:
        raise ValueError(f"the SAE of layer {layer_sae.layer} has no mean activation (x_bar) for its error")
    xf = x.float()
    err = (xf - layer_sae.decode_sparse(rows, cols, values, len(x))).square().sum(1)
    dev = (xf - layer_sae.mean.to(xf)).square().sum(1)
    return {"norm": xf.norm(dim=1), "err": err, "dev": dev, "ratio": err / dev.clamp_min(torch.finfo(dev.dtype).tiny)}


def summary_of(path: Path, seconds: float | None = None, skipped: bool = False) -> Summary:
    """A finished file's summary; `seconds` from its attributes unless this run measured them."""
    with ActivationFile(path) as f:
        attrs = f.attrs  # read once: each read converts every attribute
        l0 = float(np.mean([f.stats(i, "l0").mean() for i in f.layers])) if f.n_sentences else float("nan")
        truncated = attrs.get("n_truncated")
        return Summary(
            f.language,
            f.n_sentences,
            int(attrs["n_tokens"]),
            float(attrs.get("seconds", 0.0)) if seconds is None else seconds,
            path,
            l0,
            skipped,
            None if truncated is None else int(truncated),
        )
