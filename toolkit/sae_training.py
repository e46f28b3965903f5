"""Local SAE training: sample the corpus (training mix), collect activations, train each layer with sae-lens.

`train` trains (or resumes) one SAE per layer into `RUN/saes/{key}/layer_{i}`, `key` hashing the recipe
(`recipe`, also written to `RUN/saes/{key}/training.json`): architecture (BatchTopK saved as JumpReLU by
default, JumpReLU, or ReLU + L1), width, token budget (`quick` as configured; `standard`: every
non-held-out token once at width >= STANDARD_WIDTH), training mix (balanced, corpus, english), seed and
corpus. Layers are saved one by one through a staging folder, so a killed training restarts at the first
unfinished layer; each saved layer also holds `mean.npy`, the mean of its training activations (the x_bar
of the instrument check's FVE). Which SAE set a stage uses is decided in `toolkit.saes.load`.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from toolkit.capture import ResidualCapture, hook_name, iter_batches, job_shared_forward, tokenize
from toolkit.config import SAEConfig, SAESetup
from toolkit.corpus import Corpus, is_heldout
from toolkit.errors import UserError
from toolkit.files import atomic_write, remove, staged, stale_staging
from toolkit.models import LoadedModel
from toolkit.rundir import RunDir
from toolkit.sae_set import RECIPE_FILE, SAESet, heldout_sentences, local_set, measure_quality, print_quality, read_meta


@dataclass(frozen=True)
class Sample:
    """One training sentence: its language and its token count (BOS excluded, as in the buffers)."""
    lang: str
    sid: str
    text: str
    n_tokens: int


STANDARD_PASSES = 1  # the standard budget's passes over the non-held-out tokens
# Buffers of one layer group stay under this: every layer at once would be 23 GB at 500k tokens x 18 layers.
BUFFER_BYTES = 4 * 2**30


def training_sample(corpus: Corpus, mix: str, tokenizer, budget: int, max_length: int) -> list[Sample]:
    """Non-held-out sentences for SAE training, up to `budget` tokens, languages interleaved by sentence.

    corpus: every language as the corpus comes (long-token scripts get more tokens); english: English only;
    balanced: each language stops once it has its equal share of the budget, capped by the language with
    the fewest tokens, so that every language gives the same (within one sentence).
    """
    ids = [sid for sid in corpus.ids if not is_heldout(sid)]
    sub = corpus.subset(ids)
    langs = ["en"] if mix == "english" else list(sub.langs)
    if "en" not in sub.langs and mix == "english":
        raise UserError("sae.train_mix english needs English in the SAE training corpus")
    per_lang = {lang: _lang_sample(sub, lang, ids, tokenizer, max_length) for lang in langs}
    if mix == "balanced":
        fewest = min(sum(s.n_tokens for s in samples) for samples in per_lang.values())
        share = min(math.ceil(budget / len(langs)), fewest)
        per_lang = {lang: _first_tokens(samples, share) for lang, samples in per_lang.items()}
    interleaved = [s for group in itertools.zip_longest(*per_lang.values()) for s in group if s is not None]
    return _first_tokens(interleaved, budget)


def _lang_sample(sub: Corpus, lang: str, ids: list[str], tokenizer, max_length: int) -> list[Sample]:
    texts = sub.texts[lang]
    lengths = [len(t) - 1 for t in tokenize(tokenizer, texts, max_length)]
    return [Sample(lang, sid, text, n) for sid, text, n in zip(ids, texts, lengths)]


def _first_tokens(samples: list[Sample], budget: int) -> list[Sample]:
    """The leading sentences whose tokens reach `budget` (the last one may pass it; its excess is cut later)."""
    cut = int(np.searchsorted(np.cumsum([s.n_tokens for s in samples]), budget)) + 1
    return samples[:cut]


def tokens_per_language(samples: list[Sample], budget: int) -> dict[str, int]:
    """Tokens each language contributes once the buffers are cut at `budget` (collect_activations' order)."""
    counts: dict[str, int] = {}
    left = budget
    for s in samples:
        take = min(left, s.n_tokens)
        counts[s.lang] = counts.get(s.lang, 0) + take
        left -= take
    return counts


def recipe(setup: SAESetup, lm: LoadedModel, corpus: Corpus | None) -> dict:
    """Everything that makes a locally trained SAE set what it is; its hash is the set's cache key."""
    s = setup.sae
    return {
        "model": lm.model_id, "revision": lm.revision, "arch": s.arch, "width": s.width,
        "l1": s.l1 if s.arch == "relu" else None, "l1_warmup": s.l1_warmup,
        "target_l0": target_l0(s) if s.arch != "relu" else None, "train_tokens": s.train_tokens, "lr": s.lr,
        "batch": s.batch, "train_mix": s.train_mix, "budget": s.budget, "max_length": setup.max_length,
        "seed": setup.seed, "corpus": corpus.hash if corpus is not None else None,
    }


# A later stage of the run may differ from the extraction in these without asking for another instrument.
CORPUS_FIELDS = ("corpus", "seed")


def target_l0(s: SAEConfig) -> float:
    """--sae-target-l0, or its budget's default when 0."""
    return s.trained_l0()


def training_key(setup: SAESetup, lm: LoadedModel, corpus: Corpus) -> str:
    return hashlib.sha256(json.dumps(recipe(setup, lm, corpus), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Sizes:
    width: int
    distinct: int  # token vectors collected per layer
    samples: int  # training samples per layer (the buffer is repeated when smaller)


def sizes(s: SAEConfig, available: int) -> Sizes:
    """quick: the configured width and tokens; standard: every available token, several passes, a wider SAE."""
    if s.budget == "standard":
        return Sizes(s.trained_width(), available, max(s.train_tokens, STANDARD_PASSES * available))
    return Sizes(s.width, min(s.train_tokens, available), s.train_tokens)


def train(setup: SAESetup, lm: LoadedModel, layers: list[int], corpus: Corpus, run: RunDir,
          console: Console) -> SAESet:
    """Train (or reuse) one SAE per layer into the run's `RunDir.sae_set(key)`, `key` hashing the recipe; layers are
    saved one by one, so a killed training resumes."""
    from filelock import FileLock

    root = run.sae_set(training_key(setup, lm, corpus))
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):  # array tasks starting together train once
        return _train_locked(setup, lm, layers, corpus, console, root)


def _train_locked(setup: SAESetup, lm: LoadedModel, layers: list[int], corpus: Corpus, console: Console,
                  root: Path) -> SAESet:
    atomic_write(root / RECIPE_FILE, json.dumps(recipe(setup, lm, corpus), indent=1))
    for leftover in stale_staging(root):  # a layer whose save was killed: trained again below
        remove(leftover)
    todo = [i for i in layers if not (root / f"layer_{i}" / "cfg.json").is_file()]
    if todo:
        _train_layers(setup, lm, todo, corpus, console, root)
    saes = local_set(root, layers, lm, f"local:{root.name}")
    if todo:
        measure_quality(saes, lm, heldout_sentences(corpus), setup.batch_tokens, setup.max_length)
        for layer in layers:
            path = root / f"layer_{layer}" / "lingogap.json"
            meta = read_meta(path.parent) | {"fve": saes.layers[layer].fve, "l0": saes.layers[layer].l0}
            atomic_write(path, json.dumps(meta, indent=1))  # NaN FVE stays NaN, as the reader expects
    else:
        console.print(f"Reusing {len(layers)} trained SAE layer(s) in {root}")
    print_quality(saes, console)
    return saes


def _train_layers(setup: SAESetup, lm: LoadedModel, todo: list[int], corpus: Corpus, console: Console,
                  root: Path) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    s = setup.sae
    everything = training_sample(corpus, s.train_mix, lm.tokenizer, 2**62, setup.max_length)
    size = sizes(s, sum(x.n_tokens for x in everything))
    sample = training_sample(corpus, s.train_mix, lm.tokenizer, size.distinct, setup.max_length)
    counts = tokens_per_language(sample, size.distinct)
    done = len(_all_layers(root))
    workers = training_workers(lm.device, len(todo))
    console.print(
        f"[bold]Training {len(todo)} {s.arch} SAE(s)[/] ({s.budget} budget: width {size.width}, "
        f"{size.samples:,} samples from {sum(counts.values()):,} tokens each, mix {s.train_mix}: "
        f"{', '.join(f'{k} {v:,}' for k, v in counts.items())}; {done} layer(s) already saved; "
        f"{workers} at a time) -> {root}"
    )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:  # a log: lines below
        sentences = [(x.sid, x.text) for x in sample]
        shared = _shared_forward(progress, console, [text for _, text in sentences], setup.max_length)
        # from the shared pass a layer's buffer is gathered when its turn comes; otherwise one forward pass
        # fills as many layers' buffers as fit in BUFFER_BYTES
        group = 1 if shared else max(1, BUFFER_BYTES // (size.distinct * lm.d_model * 4))
        task = progress.add_task("SAE training samples", total=len(todo) * size.samples)
        with _Trainers(workers, size.samples, console) as trainers:
            for start in range(0, len(todo), group):
                chunk = todo[start:start + group]
                if not shared:
                    progress.update(task, description=f"collecting activations ({len(chunk)} layers)")
                # quiet: a second live progress display cannot run inside this one
                buffers = collect_activations(lm, chunk, sentences, size.distinct, setup.batch_tokens,
                                              setup.max_length, Console(quiet=True))
                for layer in chunk:
                    acts = buffers.pop(layer)
                    trainer = training_run(setup, lm, layer, acts, size, _advance(progress, task, size.samples))
                    meta = {"train_tokens_per_language": counts, **_meta_of(s, size)}
                    trainers.submit(layer, trainer, lambda sae, layer=layer, acts=acts, meta=meta:
                                    _save_layer(root, layer, sae, acts, meta))


def _shared_forward(progress, console: Console, texts: list[str], max_length: int) -> bool:
    """Run the job's shared forward pass (`toolkit.capture.shared_forward`) now, if it registered one; whether it
    holds the training sample (a training corpus of its own, `--sae-train-corpus`, is not in it)."""
    shared = job_shared_forward()
    if shared is None or shared.ready:
        return shared is not None and shared.holds(texts, max_length)
    tokens = shared.tokens
    task = progress.add_task("forward pass over the corpus (kept for extraction)", total=tokens)
    kept = shared.prepare(lambda n: progress.update(task, advance=n))
    progress.remove_task(task)
    if kept and not console.is_terminal:
        console.print(f"Forward pass over the corpus ({tokens:,} tokens, kept for SAE training and extraction) in "
                      f"{shared.seconds:.1f} s", highlight=False)
    return kept and shared.holds(texts, max_length)


class _Trainers:
    """SAE layers trained `workers` at a time in threads, each with its own intra-op threads; each finished layer
    is handed to its `done` callback and logged in submission order, so a log reads layer by layer."""

    def __init__(self, workers: int, samples: int, console: Console) -> None:
        self.workers = workers
        self.samples = samples
        self.console = console
        self.pending: collections.deque = collections.deque()
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="sae-training")
        self.threads_before = torch.get_num_threads()

    def __enter__(self) -> _Trainers:
        return self

    def submit(self, layer: int, trainer, done: Callable[[object], None]) -> None:
        self.pending.append((layer, done, self.pool.submit(_fit, trainer, worker_threads())))
        while len(self.pending) > self.workers:  # at most one buffer waits beside those in training
            self._finish()

    def _finish(self) -> None:
        layer, done, future = self.pending.popleft()
        sae, seconds = future.result()
        done(sae)
        if not self.console.is_terminal:  # a log gets one line per layer; a terminal has the bar
            self.console.print(f"SAE layer {layer}: trained on {self.samples:,} samples in {seconds:.1f} s",
                               highlight=False)

    def __exit__(self, kind, *exc) -> None:
        try:
            if kind is None:
                while self.pending:
                    self._finish()
        finally:
            for _, _, future in self.pending:
                future.cancel()
            self.pool.shutdown(wait=True)
            torch.set_num_threads(self.threads_before)  # a worker's setting is also the process's default


def training_workers(device: torch.device, layers: int) -> int:
    """Layers trained at once on a CPU: the threads torch may use, `worker_threads` each."""
    if device.type != "cpu":
        return 1
    return max(1, min(layers, torch.get_num_threads() // worker_threads()))


def worker_threads() -> int:
    """SAE steps are small matmuls, where threads mostly synchronise: with 2 threads on a 2-core machine they ran
    ~20x slower (220 vs 4,700 samples/s). Each trainer gets a quarter of the cores, at least 1; parallel trainers
    use the rest."""
    return max(1, (os.cpu_count() or 1) // 4)


def _fit(trainer, threads: int):
    """One layer's training in a worker thread, with its own intra-op threads; the SAE and its wall time."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    return trainer.fit(), time.perf_counter() - start


def _advance(progress, task, samples: int) -> Callable[[int], None]:
    """Progress for one layer's samples; the trainer's norm estimate draws a few batches more, not counted past it."""
    fed = [0]

    def advance(n: int) -> None:
        step = min(n, samples - fed[0])
        fed[0] += n
        if step > 0:
            progress.update(task, advance=step)

    return advance


def _all_layers(root: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in root.glob("layer_*") if (p / "cfg.json").is_file())


def _meta_of(s: SAEConfig, size: Sizes) -> dict:
    return {"arch": s.arch, "train_mix": s.train_mix, "budget": s.budget, "width": size.width,
            "train_samples": size.samples, "distinct_tokens": size.distinct}


def _save_layer(root: Path, layer: int, sae, acts: torch.Tensor, meta: dict) -> None:
    """Write the layer in a staging folder, then rename it: a folder with cfg.json is a finished layer."""
    with staged(root / f"layer_{layer}", replace_dir=True) as tmp:
        sae.save_inference_model(str(tmp))
        np.save(tmp / "mean.npy", acts.double().mean(0).float().numpy())
        (tmp / "lingogap.json").write_text(json.dumps({"layer": layer, "hook": hook_name(layer), **meta}, indent=1))


def collect_activations(
    lm: LoadedModel, layers: list[int], sentences: list[tuple[str, str]], budget: int, batch_tokens: int,
    max_length: int, console: Console | None = None,
) -> dict[int, torch.Tensor]:
    """Up to `budget` residual vectors per layer (BOS and padding excluded) from shared forward passes."""
    from rich.progress import Progress
    buffers = {i: torch.empty((budget, lm.d_model), dtype=torch.float32) for i in layers}
    filled = 0
    state = {}

    def sink(layer: int, hidden: torch.Tensor) -> None:
        state[layer] = hidden[state["keep"]].float().cpu()

    # Take sentences in the given (language-interleaved) order up to the budget *before* batching:
    # batches run longest first, so cutting the batches instead would favour long-token scripts.
    lengths = [len(ids) - 1 for ids in tokenize(lm.tokenizer, [t for _, t in sentences], max_length)]
    cut = int(np.searchsorted(np.cumsum(lengths), budget)) + 1
    sentences = sentences[:cut]
    progress = Progress(console=console or Console(stderr=True), transient=True)
    with torch.inference_mode(), ResidualCapture(lm, layers, sink) as cap, progress:
        task = progress.add_task("collecting activations", total=budget)
        for batch in iter_batches(sentences, lm.tokenizer, batch_tokens, max_length):
            state["keep"] = batch.keep.to(lm.device)
            cap.run(batch)
            take = min(budget - filled, int(state["keep"].sum()))
            for layer in layers:
                buffers[layer][filled:filled + take] = state.pop(layer)[:take]
            filled += take
            progress.update(task, completed=filled)
            if filled >= budget:
                break
    return {i: b[:filled] for i, b in buffers.items()}


def _training_sae(s: SAEConfig, lm: LoadedModel, width: int, steps: int):
    """The sae-lens training SAE of `s.arch`, normalising activations in training (folded back after):
    Gemma's residual norm grows ~1000x with depth."""
    import sae_lens

    common = {"d_in": lm.d_model, "d_sae": width, "device": str(lm.device),
              "normalize_activations": "expected_average_only_in"}
    if s.arch == "jumprelu":  # Gemma Scope 2's quadratic penalty around a target L0: no coefficient to tune
        sae_cfg = sae_lens.JumpReLUTrainingSAEConfig(
            **common, jumprelu_sparsity_loss_mode="quadratic", target_l0=target_l0(s),
            l0_warm_up_steps=int(s.l1_warmup * steps))
        return sae_lens.JumpReLUTrainingSAE(sae_cfg)
    if s.arch == "batchtopk":  # saved as a JumpReLU SAE with the learnt global threshold
        return sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(**common, k=target_l0(s)))
    # ramping the L1 term up keeps features alive: without it, 65-90 % of them died on Gemma 3
    sae_cfg = sae_lens.StandardTrainingSAEConfig(**common, l1_coefficient=s.l1,
                                                 l1_warm_up_steps=int(s.l1_warmup * steps))
    return sae_lens.StandardTrainingSAE(sae_cfg)


def training_run(setup: SAESetup, lm: LoadedModel, layer: int, acts: torch.Tensor, size: Sizes,
                 advance: Callable[[int], None] | None = None):
    """One layer's sae-lens trainer on its activation buffer `acts`, ready to `fit()`. Built in the calling
    thread: the SAE's initialisation draws from the global generator, seeded per layer."""
    from sae_lens import SAETrainer
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    s = setup.sae
    torch.manual_seed(setup.seed * 1000 + layer)
    batch = min(s.batch, len(acts))
    total = max(size.samples, batch)
    sae = _training_sae(s, lm, size.width, total // batch)
    sae.cfg.metadata.hook_name = hook_name(layer)
    sae.cfg.metadata.model_name = lm.model_id
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total, train_batch_size_samples=batch, lr=s.lr,
        lr_end=s.lr / 10, lr_scheduler_name="cosineannealing", device=str(lm.device),
        n_batches_for_norm_estimate=max(1, min(50, len(acts) // batch)), logger=LoggingConfig(log_to_wandb=False),
    )
    # Gemma's residual stream has a large mean (a few huge dimensions); starting the decoder bias
    # there, in the trainer's normalised units, spares the short CPU budget from learning it.
    scale = lm.d_model**0.5 / acts.norm(dim=1).mean()
    with torch.no_grad():
        sae.b_dec.copy_((acts.mean(0) * scale).to(sae.b_dec))
    return SAETrainer(trainer_cfg, sae, _shuffled(acts.to(lm.device), batch, layer, advance))


def train_one(setup: SAESetup, lm: LoadedModel, layer: int, acts: torch.Tensor, size: Sizes,
              advance: Callable[[int], None] | None = None):
    """One layer's SAE trained on `acts` in this thread, as one training worker runs it (what calibration times)."""
    before = torch.get_num_threads()
    try:
        return _fit(training_run(setup, lm, layer, acts, size, advance), worker_threads())[0]
    finally:
        torch.set_num_threads(before)


def _shuffled(acts: torch.Tensor, batch: int, seed: int,
              advance: Callable[[int], None] | None = None) -> Iterator[torch.Tensor]:
    """Endless epochs over the buffer, reshuffled each time (seeded); `advance` counts the samples handed out."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(acts), generator=gen)
        for start in range(0, len(order) - batch + 1, batch):
            if advance is not None:
                advance(batch)
            yield acts[order[start:start + batch]]
