"""Extraction job: residual stream of every selected layer -> per-layer SAE codes -> HDF5, resumable.

One unit of work is one language (or one shard of it); `run` takes several so a laptop loads the
model and SAEs once, while a Slurm array gives each task one unit.
"""

from __future__ import annotations

import ctypes
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from toolkit import __version__, models
from toolkit import corpus as corpora
from toolkit import saes as sae_sources
from toolkit.capture import HOOK_TEMPLATE, ResidualCapture, TokenBatch, iter_batches
from toolkit.config import Config, parse_layers
from toolkit.corpus import Corpus
from toolkit.errors import UserError
from toolkit.plan import human_bytes
from toolkit.rundir import RunDir
from toolkit.store import ActivationFile, ActivationWriter, Batch, LayerBatch, shard_name


@dataclass
class Unit:
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


def units(cfg: Config) -> list[Unit]:
    return [Unit(lang, k, cfg.extract.shards) for lang in cfg.lang_codes for k in range(cfg.extract.shards)]


def run(cfg: Config, todo: list[Unit] | None = None, console: Console | None = None) -> list[Summary]:
    """Extract the given units (default: every language and shard of the config)."""
    console = console or Console(stderr=True)
    fixed_mmap_threshold()
    todo = todo if todo is not None else units(cfg)
    corpus = corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)
    run_dir = RunDir(cfg.run_dir)
    run_dir.write_manifest(cfg, "extract", corpus.hash)
    lm = models.load(cfg.model)
    layers = parse_layers(cfg.run.layers, lm.n_layers)
    saes = sae_sources.load(cfg, lm, layers, corpus, console)
    saes.drop_decoders()
    summaries = [extract_unit(cfg, lm, saes, corpus, unit, layers, console) for unit in todo]
    print_summary(summaries, console)
    return summaries


def fixed_mmap_threshold(size: int = 4 << 20) -> bool:
    """Give buffers of `size` bytes and more back to the OS when freed (glibc; a no-op elsewhere).

    glibc raises its mmap threshold as large blocks are freed (up to 32 MiB), after which tensors of
    varying batch shapes come from a heap that fragments: peak RSS grew 1.37x from 1x to 16x the corpus
    at 256-token batches, 1.07x with this fix. 256 KiB instead cost 20 % of throughput in page faults
    for no lower peak (docs/performance.md).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(-3, size))  # -3: M_MMAP_THRESHOLD in malloc.h


def shard_ids(ids: list[str], shard: int, n_shards: int) -> list[str]:
    """Contiguous blocks of ids, so shard files of one language concatenate in corpus order."""
    bounds = np.linspace(0, len(ids), n_shards + 1).round().astype(int)
    return ids[bounds[shard]:bounds[shard + 1]]


def identity(cfg: Config, lm: models.LoadedModel, saes: sae_sources.SAESet, corpus: Corpus, unit: Unit,
             layers: list[int]) -> dict:
    return {
        "language": unit.lang, "shard": unit.shard, "n_shards": unit.n_shards,
        "corpus_name": corpus.name, "corpus_hash": corpus.lang_hash(unit.lang), "n_corpus": len(corpus.ids),
        "model_id": lm.model_id, "model_revision": lm.revision, "preset": cfg.run.preset,
        "adapter": cfg.model.adapter, "compute_dtype": str(lm.dtype).removeprefix("torch."),
        "d_model": lm.d_model, "layers": layers, "hook_point": HOOK_TEMPLATE,
        "sae_source": saes.source, "sae_ids": saes.ids, "d_sae": [saes.layers[i].d_sae for i in layers],
        "code_dtype": cfg.extract.code_dtype, "max_length": cfg.extract.max_length,
        "batch_tokens": cfg.extract.batch_tokens, "save_resid": cfg.extract.save_resid,
    }


def extract_unit(cfg: Config, lm: models.LoadedModel, saes: sae_sources.SAESet, corpus: Corpus, unit: Unit,
                 layers: list[int], console: Console) -> Summary:
    path = RunDir(cfg.run_dir).activations / shard_name(unit.lang, unit.shard, unit.n_shards)
    writer = ActivationWriter(path, identity(cfg, lm, saes, corpus, unit, layers), layers,
                              cfg.extract.code_dtype, overwrite=cfg.extract.overwrite)
    if writer.complete:
        return _summary_of(path, skipped=True)
    sub = corpus.subset(shard_ids(corpus.ids, unit.shard, unit.n_shards))
    sentences = sub.sentences(unit.lang)
    # The plan depends only on the text and the config, so a resumed run skips exactly the batches
    # already committed and its file equals an uninterrupted run's.
    batches = list(iter_batches(sentences, lm.tokenizer, cfg.extract.batch_tokens, cfg.extract.max_length))
    committed = writer.n_parts
    done_ids = [sid for b in batches[:committed] for sid in b.sentence_ids]
    if set(done_ids) != writer.done_sentence_ids():
        raise UserError(f"{writer.parts} does not match the current batch plan; rerun with --overwrite")
    started = time.perf_counter()
    n_tokens = sum(b.n_real - len(b.sentence_ids) for b in batches[committed:])
    # Batch k is written (and fsynced) by one I/O thread while batch k+1 is computed; parts stay in order.
    with _progress(console) as progress, ThreadPoolExecutor(1, thread_name_prefix="hdf5-parts") as io:
        task = progress.add_task(unit.lang, total=len(sentences), completed=len(done_ids), tokens=0.0)
        done_tokens = 0
        writing = None
        for batch in batches[committed:]:
            encoded = encode_batch(lm, saes, batch, layers, cfg.extract.save_resid)
            if writing is not None:
                writing.result()
            writing = io.submit(writer.write_batch, encoded)
            done_tokens += batch.n_real - len(batch.sentence_ids)
            rate = done_tokens / max(time.perf_counter() - started, 1e-9)
            progress.update(task, advance=len(batch.sentence_ids), tokens=rate)
        if writing is not None:
            writing.result()
    seconds = time.perf_counter() - started
    writer.finalize(
        {"lingogap_version": __version__, "seconds": seconds, "sae_quality": saes.quality(),
         "tokens_per_second": n_tokens / max(seconds, 1e-9)},
        {i: {"sae_id": saes.layers[i].sae_id, "d_sae": saes.layers[i].d_sae, "fve": saes.layers[i].fve,
             "l0": saes.layers[i].l0} for i in layers},
    )
    return _summary_of(path, seconds=seconds)


def encode_batch(lm: models.LoadedModel, saes: sae_sources.SAESet, batch: TokenBatch, layers: list[int],
                 save_resid: bool) -> Batch:
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

    def sink(layer: int, hidden: torch.Tensor) -> None:
        x = hidden[keep_dev]
        rows, cols, values = saes.layers[layer].encode_sparse(x)
        values = values.float()  # the statistics come from the few nonzero entries
        who = owner[rows]
        mass = torch.zeros(n_sent, device=values.device).index_add_(0, who, values) / per_sentence
        l0 = torch.bincount(who, minlength=n_sent) / per_sentence
        peak = torch.zeros(n_sent, device=values.device).scatter_reduce_(0, who, values, "amax", include_self=False)
        indptr = torch.zeros(len(x) + 1, dtype=torch.long)
        indptr[1:] = torch.bincount(rows.cpu(), minlength=len(x)).cumsum(0)
        out.layers[layer] = LayerBatch(
            indptr=indptr.numpy(), indices=cols.cpu().numpy(), values=values.cpu().numpy(),
            mass=mass.cpu().numpy(), l0=l0.cpu().numpy(), max=peak.cpu().numpy(),
            resid=x.float().cpu().numpy() if save_resid else None,
        )

    with torch.inference_mode(), ResidualCapture(lm, layers, sink) as cap:
        cap.run(batch)
    return out


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:>4}"), BarColumn(), MofNCompleteColumn(), TextColumn("sentences"),
        TextColumn("{task.fields[tokens]:,.0f} tok/s"), TimeRemainingColumn(), console=console, transient=False,
    )


def _summary_of(path: Path, seconds: float | None = None, skipped: bool = False) -> Summary:
    with ActivationFile(path) as f:
        layers = f.layers
        l0 = float(np.mean([f.stats(i, "l0").mean() for i in layers])) if f.n_sentences else float("nan")
        return Summary(f.language, f.n_sentences, int(f.attrs["n_tokens"]),
                       float(f.attrs.get("seconds", 0.0)) if seconds is None else seconds, path, l0, skipped)


def print_summary(summaries: list[Summary], console: Console) -> None:
    table = Table(title="Extraction")
    for col in ("language", "sentences", "tokens", "seconds", "tok/s", "file size", "mean L0", ""):
        table.add_column(col, justify="left" if col in ("language", "") else "right")
    for s in summaries:
        table.add_row(s.lang, f"{s.sentences:,}", f"{s.tokens:,}", f"{s.seconds:.1f}",
                      f"{s.tokens / max(s.seconds, 1e-9):,.0f}", human_bytes(s.path.stat().st_size), f"{s.mean_l0:.1f}",
                      "already done" if s.skipped else "")
    console.print(table)
