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

import hashlib
import itertools
import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from toolkit.capture import ResidualCapture, hook_name, iter_batches, tokenize
from toolkit.config import Config
from toolkit.corpus import HELDOUT_FRACTION, Corpus, is_heldout  # noqa: F401 (re-exported)
from toolkit.errors import HubUnreachable, UserError
from toolkit.models import LoadedModel
from toolkit.sae_source import SAESource as SAESource  # re-exported: `--sae` parsed, torch-free

QUALITY_CHUNK_TOKENS = 256


@dataclass
class LayerSAE:
    layer: int
    sae: torch.nn.Module
    sae_id: str
    fve: float = math.nan
    l0: float = math.nan
    mean: torch.Tensor | None = None  # x_bar: the mean activation the SAE was trained on (or measured), for FVE
    mean_source: str = ""

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes of `x`, equal to `sae.encode(x)`, with the same gradient with respect to `x`.

        For sae-lens's ReLU and JumpReLU SAEs: one addmm and one masked select, where sae-lens's encode
        makes five passes over tokens x d_sae (bias, ReLU, mask, mask as floats, product), each
        with its backward when training through it (`toolkit.align`).
        """
        threshold = _plain_threshold(self.sae)
        if threshold is None:
            return self.sae.encode(x)
        pre = self._pre_activation(x)
        return torch.where(pre > threshold, pre, 0.0)

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, cols, values) of the nonzero codes of `x`, the same as `sae.encode(x)` has them.

        For sae-lens's ReLU and JumpReLU SAEs the dense codes are never built: one addmm, one comparison
        with the effective threshold, one gather. sae-lens's own encode makes four tokens x d_sae
        tensors, and finding the nonzeros takes another pass; at 16k features this path is 1.9x faster
        (docs/performance.md). Other architectures go through their own `encode`.
        """
        threshold = _plain_threshold(self.sae)
        if threshold is None:
            codes = self.sae.encode(x)
            rows, cols = codes.nonzero(as_tuple=True)
            return rows, cols, codes[rows, cols]
        pre = self._pre_activation(x)
        rows, cols = (pre > threshold).nonzero(as_tuple=True)
        return rows, cols, pre[rows, cols]

    def decode_sparse(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n_tokens: int
                      ) -> torch.Tensor:
        """x_hat of `n_tokens` tokens from their nonzero codes (as `encode_sparse` gives them), in float32.

        Equal to `sae.decode` of the dense codes: a sparse product touches only the active decoder rows,
        so reconstructing costs about L0 x d_model per token instead of d_sae x d_model. Call it right
        after `encode_sparse` of the same tokens: SAEs that normalise their input keep that batch's scale.
        """
        sae = self.sae
        if _plain_threshold(sae) is None:
            codes = torch.zeros(n_tokens, self.d_sae, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
            codes[rows, cols] = values.to(codes.dtype)
            return sae.decode(codes).float()
        sparse = torch.sparse_coo_tensor(torch.stack([rows, cols]), values.to(sae.W_dec.dtype), (n_tokens, self.d_sae),
                                         check_invariants=False)
        out = torch.sparse.mm(sparse, sae.W_dec) + sae.b_dec
        return sae.run_time_activation_norm_fn_out(sae.hook_sae_recons(out)).float()

    def _pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.sae.b_enc, self.sae.process_sae_in(x), self.sae.W_enc)


def _plain_threshold(sae: torch.nn.Module) -> torch.Tensor | float | None:
    """The value a pre-activation must exceed to give a nonzero code, or None where encode does more."""
    from sae_lens import JumpReLUSAE, StandardSAE

    hooked = any(h._forward_hooks or h._forward_pre_hooks for h in (sae.hook_sae_acts_pre, sae.hook_sae_acts_post))
    if hooked or not isinstance(sae.activation_fn, torch.nn.ReLU):
        return None
    if type(sae) is StandardSAE:
        return 0.0
    if type(sae) is JumpReLUSAE:  # ReLU(pre) * (pre > threshold): nonzero where pre > max(threshold, 0)
        return sae.threshold.clamp_min(0)
    return None


@dataclass
class SAESet:
    source: str  # resolved source, e.g. "local:RUN/saes/ab12" or "pretrained:gemma-scope-..."
    layers: dict[int, LayerSAE]

    @property
    def ids(self) -> list[str]:
        return [self.layers[i].sae_id for i in sorted(self.layers)]

    def quality(self) -> dict[str, dict[str, float]]:
        return {str(i): {"fve": s.fve, "l0": s.l0} for i, s in sorted(self.layers.items())}

    def own_memory(self) -> None:
        """Copy CPU weights out of the safetensors file's mapping, which would otherwise keep every page
        read so far resident. Decoders stay: extraction reconstructs from the sparse codes (recon_err)."""
        for layer in self.layers.values():
            if layer.sae.W_enc.device.type == "cpu":
                for tensor in itertools.chain(layer.sae.parameters(), layer.sae.buffers()):
                    tensor.data = tensor.data.clone()



def check(sae: torch.nn.Module, layer: int, d_model: int, where: str) -> None:
    """Refuse an SAE that cannot belong at this layer of this model."""
    d_in = int(sae.cfg.d_in)
    if d_in != d_model:
        raise UserError(f"{where}: the SAE for layer {layer} has d_in={d_in} but the model width is {d_model}")
    hook = sae.cfg.metadata.get("hook_name")
    if hook and hook != hook_name(layer):
        raise UserError(f"{where}: the SAE for layer {layer} was trained on hook {hook!r}, not {hook_name(layer)!r}")


def training_corpus(cfg: Config, run_corpus: Corpus | None = None) -> Corpus:
    """`sae.train_corpus` if set, else the run's corpus (with the same --max-sentences)."""
    from toolkit import corpus as corpora

    if run_corpus is not None and not cfg.sae.train_corpus:
        return run_corpus
    return corpora.load(cfg.sae.train_corpus or cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)


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
        try:
            saes = _pretrained(cfg.sae.release, cfg.sae.id_template, layers, lm)
        except HubUnreachable as exc:
            console.print(f"[yellow]SAEs:[/] {exc}. Training small SAEs locally instead (cached in the run).")
            saes = train(cfg, lm, layers, training_corpus(cfg, corpus), console)
    elif source.startswith("pretrained:"):
        saes = _pretrained(source.split(":", 1)[1], cfg.sae.id_template, layers, lm)
    elif source.startswith("dir:"):
        saes = _from_dir(Path(source.split(":", 1)[1]), layers, lm)
    elif source == "train":
        saes = train(cfg, lm, layers, training_corpus(cfg, corpus), console)
    else:
        saes = _random(cfg.sae.width, layers, lm, cfg.run.seed)
    # x_bar (the FVE's reference point) of an SAE that recorded none comes from the same held-out pass
    missing = [i for i in layers if not math.isfinite(saes.layers[i].fve) or saes.layers[i].mean is None]
    if missing:
        measure_quality(saes, lm, _heldout(corpus), cfg.extract.batch_tokens, cfg.extract.max_length)
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
            return _local_set(root, layers, lm, source)
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
        return _from_dir(Path(source.split(":", 1)[1]), layers, lm)
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


def _local_set(root: Path, layers: list[int], lm: LoadedModel, source: str) -> SAESet:
    saes = _from_dir(root, layers, lm)
    saes.source = source
    for layer in layers:
        saes.layers[layer].sae_id = f"local:{root.name}/layer_{layer}"
    return saes


def _pretrained(release: str, template: str, layers: list[int], lm: LoadedModel) -> SAESet:
    from sae_lens import SAE

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


def _from_dir(root: Path, layers: list[int], lm: LoadedModel) -> SAESet:
    from sae_lens import SAE

    out = {}
    for layer in layers:
        candidates = [root / f"layer_{layer}", root / str(layer)]
        path = next((p for p in candidates if (p / "cfg.json").is_file()), None)
        if path is None:
            raise UserError(f"sae.source dir:{root}: no SAE for layer {layer} (expected {candidates[0]}/cfg.json)")
        sae = SAE.load_from_disk(str(path), device=str(lm.device))
        check(sae, layer, lm.d_model, str(path))
        meta = _read_meta(path)
        mean = _read_mean(path, lm)
        out[layer] = LayerSAE(layer, sae.eval(), str(path), meta.get("fve", math.nan), meta.get("l0", math.nan),
                              mean, "the SAE's training activations (mean.npy)" if mean is not None else "")
    return SAESet(f"dir:{root.resolve()}", out)


def _random(width: int, layers: list[int], lm: LoadedModel, seed: int) -> SAESet:
    from sae_lens import StandardSAE, StandardSAEConfig

    out = {}
    for layer in layers:
        torch.manual_seed(seed * 1000 + layer)
        cfg = StandardSAEConfig(d_in=lm.d_model, d_sae=width, device=str(lm.device))
        cfg.metadata.hook_name = hook_name(layer)
        out[layer] = LayerSAE(layer, StandardSAE(cfg).eval(), f"random:seed{seed}/layer_{layer}")
    return SAESet(f"random:seed{seed}", out)


def _read_mean(path: Path, lm: LoadedModel) -> torch.Tensor | None:
    file = path / "mean.npy"
    if not file.is_file():
        return None
    return torch.from_numpy(np.load(file, allow_pickle=False)).to(lm.device)


def _read_meta(path: Path) -> dict:
    meta = path / "lingogap.json"
    return json.loads(meta.read_text()) if meta.is_file() else {}


def _heldout(corpus: Corpus) -> list[tuple[str, str]]:
    ids = [sid for sid in corpus.ids if is_heldout(sid)] or corpus.ids[:1]
    sub = corpus.subset(ids)
    return [pair for lang in sub.langs for pair in sub.sentences(lang)]


@dataclass(frozen=True)
class Sample:
    """One training sentence: its language and its token count (BOS excluded, as in the buffers)."""
    lang: str
    sid: str
    text: str
    n_tokens: int


# Standard budget, sized to an hour on 2 cores for NTREX (~450k training tokens, 18 layers): BatchTopK steps
# ran at ~2,800 samples/s at width 2,048 and ~1,350 at 4,096 (one thread, shared machine). Provisional:
# not yet measured end to end (docs/saes.md).
STANDARD_WIDTH = 2048
STANDARD_PASSES = 1
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


def recipe(cfg: Config, lm: LoadedModel, corpus: Corpus | None) -> dict:
    """Everything that makes a locally trained SAE set what it is; its hash is the set's cache key."""
    s = cfg.sae
    return {
        "model": lm.model_id, "revision": lm.revision, "arch": s.arch, "width": s.width,
        "l1": s.l1 if s.arch == "relu" else None, "l1_warmup": s.l1_warmup,
        "target_l0": s.target_l0 if s.arch != "relu" else None, "train_tokens": s.train_tokens, "lr": s.lr,
        "batch": s.batch, "train_mix": s.train_mix, "budget": s.budget, "max_length": cfg.extract.max_length,
        "seed": cfg.run.seed, "corpus": corpus.hash if corpus is not None else None,
    }


# A later stage of the run may differ from the extraction in these without asking for another instrument.
CORPUS_FIELDS = ("corpus", "seed")


def training_key(cfg: Config, lm: LoadedModel, corpus: Corpus) -> str:
    return hashlib.sha256(json.dumps(recipe(cfg, lm, corpus), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Sizes:
    width: int
    distinct: int  # token vectors collected per layer
    samples: int  # training samples per layer (the buffer is repeated when smaller)


def sizes(cfg: Config, available: int) -> Sizes:
    """quick: the configured width and tokens; standard: every available token, several passes, a wider SAE."""
    s = cfg.sae
    if s.budget == "standard":
        return Sizes(max(s.width, STANDARD_WIDTH), available, max(s.train_tokens, STANDARD_PASSES * available))
    return Sizes(s.width, min(s.train_tokens, available), s.train_tokens)


def train(cfg: Config, lm: LoadedModel, layers: list[int], corpus: Corpus, console: Console) -> SAESet:
    """Train (or reuse) one SAE per layer; layers are saved one by one, so a killed training resumes."""
    from filelock import FileLock

    root = cfg.run_dir / "saes" / training_key(cfg, lm, corpus)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):  # array tasks starting together train once
        return _train_locked(cfg, lm, layers, corpus, console, root)


def _train_locked(cfg: Config, lm: LoadedModel, layers: list[int], corpus: Corpus, console: Console,
                  root: Path) -> SAESet:
    (root / "training.json").write_text(json.dumps(recipe(cfg, lm, corpus), indent=1))
    todo = [i for i in layers if not (root / f"layer_{i}" / "cfg.json").is_file()]
    if todo:
        _train_layers(cfg, lm, todo, corpus, console, root)
    saes = _local_set(root, layers, lm, f"local:{root.name}")
    if todo:
        measure_quality(saes, lm, _heldout(corpus), cfg.extract.batch_tokens, cfg.extract.max_length)
        for layer in layers:
            path = root / f"layer_{layer}" / "lingogap.json"
            meta = _read_meta(path.parent) | {"fve": saes.layers[layer].fve, "l0": saes.layers[layer].l0}
            path.write_text(json.dumps(meta, indent=1))
        print_quality(saes, console)
    return saes


def _train_layers(cfg: Config, lm: LoadedModel, todo: list[int], corpus: Corpus, console: Console,
                  root: Path) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    everything = training_sample(corpus, cfg.sae.train_mix, lm.tokenizer, 2**62, cfg.extract.max_length)
    size = sizes(cfg, sum(s.n_tokens for s in everything))
    sample = training_sample(corpus, cfg.sae.train_mix, lm.tokenizer, size.distinct, cfg.extract.max_length)
    counts = tokens_per_language(sample, size.distinct)
    group = max(1, BUFFER_BYTES // (size.distinct * lm.d_model * 4))
    done = len(_all_layers(root))
    console.print(
        f"[bold]Training {len(todo)} {cfg.sae.arch} SAE(s)[/] ({cfg.sae.budget} budget: width {size.width}, "
        f"{size.samples:,} samples from {sum(counts.values()):,} tokens each, mix {cfg.sae.train_mix}: "
        f"{', '.join(f'{k} {v:,}' for k, v in counts.items())}; {done} layer(s) already saved) -> {root}"
    )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("SAE training samples", total=len(todo) * size.samples)
        for start in range(0, len(todo), group):
            chunk = todo[start:start + group]
            progress.update(task, description=f"collecting activations ({len(chunk)} layers)")
            # quiet: a second live progress display cannot run inside this one
            buffers = collect_activations(lm, chunk, [(s.sid, s.text) for s in sample], size.distinct,
                                          cfg.extract.batch_tokens, cfg.extract.max_length, Console(quiet=True))
            for layer in chunk:
                progress.update(task, description=f"SAE layer {layer}")
                acts = buffers.pop(layer)
                sae = _train_one(cfg, lm, layer, acts, size, _advance(progress, task, size.samples))
                _save_layer(root, layer, sae, acts, {"train_tokens_per_language": counts, **_meta_of(cfg, size)})
                del acts


def _advance(progress, task, samples: int) -> Callable[[int], None]:
    """Progress for one layer's samples; the trainer's norm estimate draws a few batches more, not counted past it."""
    start = progress.tasks[task].completed
    fed = [0]

    def advance(n: int) -> None:
        fed[0] += n
        progress.update(task, completed=start + min(fed[0], samples))

    return advance


def _all_layers(root: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in root.glob("layer_*") if (p / "cfg.json").is_file())


def _meta_of(cfg: Config, size: Sizes) -> dict:
    s = cfg.sae
    return {"arch": s.arch, "train_mix": s.train_mix, "budget": s.budget, "width": size.width,
            "train_samples": size.samples, "distinct_tokens": size.distinct}


def _save_layer(root: Path, layer: int, sae, acts: torch.Tensor, meta: dict) -> None:
    """Write the layer in a temporary folder, then rename it: a folder with cfg.json is a finished layer."""
    import shutil

    path = root / f"layer_{layer}"
    tmp = root / f".layer_{layer}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    sae.save_inference_model(str(tmp))
    np.save(tmp / "mean.npy", acts.double().mean(0).float().numpy())
    (tmp / "lingogap.json").write_text(json.dumps({"layer": layer, "hook": hook_name(layer), **meta}, indent=1))
    os.replace(tmp, path)


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


def _training_sae(cfg: Config, lm: LoadedModel, width: int, steps: int):
    """The sae-lens training SAE of `cfg.sae.arch`, normalising activations in training (folded back after):
    Gemma's residual norm grows ~1000x with depth."""
    import sae_lens

    s = cfg.sae
    common = {"d_in": lm.d_model, "d_sae": width, "device": str(lm.device),
              "normalize_activations": "expected_average_only_in"}
    if s.arch == "jumprelu":  # Gemma Scope 2's quadratic penalty around a target L0: no coefficient to tune
        sae_cfg = sae_lens.JumpReLUTrainingSAEConfig(
            **common, jumprelu_sparsity_loss_mode="quadratic", target_l0=s.target_l0,
            l0_warm_up_steps=int(s.l1_warmup * steps))
        return sae_lens.JumpReLUTrainingSAE(sae_cfg)
    if s.arch == "batchtopk":  # saved as a JumpReLU SAE with the learnt global threshold
        return sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(**common, k=s.target_l0))
    # ramping the L1 term up keeps features alive: without it, 65-90 % of them died on Gemma 3
    sae_cfg = sae_lens.StandardTrainingSAEConfig(**common, l1_coefficient=s.l1,
                                                 l1_warm_up_steps=int(s.l1_warmup * steps))
    return sae_lens.StandardTrainingSAE(sae_cfg)


def _train_one(cfg: Config, lm: LoadedModel, layer: int, acts: torch.Tensor, size: Sizes,
               advance: Callable[[int], None] | None = None):
    from sae_lens import SAETrainer
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    torch.manual_seed(cfg.run.seed * 1000 + layer)
    batch = min(cfg.sae.batch, len(acts))
    total = max(size.samples, batch)
    sae = _training_sae(cfg, lm, size.width, total // batch)
    sae.cfg.metadata.hook_name = hook_name(layer)
    sae.cfg.metadata.model_name = lm.model_id
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total, train_batch_size_samples=batch, lr=cfg.sae.lr,
        lr_end=cfg.sae.lr / 10, lr_scheduler_name="cosineannealing", device=str(lm.device),
        n_batches_for_norm_estimate=max(1, min(50, len(acts) // batch)), logger=LoggingConfig(log_to_wandb=False),
    )
    # Gemma's residual stream has a large mean (a few huge dimensions); starting the decoder bias
    # there, in the trainer's normalised units, spares the short CPU budget from learning it.
    scale = lm.d_model**0.5 / acts.norm(dim=1).mean()
    with torch.no_grad():
        sae.b_dec.copy_((acts.mean(0) * scale).to(sae.b_dec))
    trainer = SAETrainer(trainer_cfg, sae, _shuffled(acts.to(lm.device), batch, layer, advance))
    with _few_threads():
        return trainer.fit()


@contextmanager
def _few_threads():
    """SAE steps are small matmuls, where threads mostly synchronise: with 2 threads on a 2-core
    machine they ran ~20x slower (220 vs 4,700 samples/s). Use a quarter of the cores, at least 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, (os.cpu_count() or 1) // 4)))
    try:
        yield
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


def measure_quality(saes: SAESet, lm: LoadedModel, sentences: list[tuple[str, str]], batch_tokens: int,
                    max_length: int) -> None:
    """Fraction of variance explained and mean L0 per layer on held-out sentences (float64 sums)."""
    sse = dict.fromkeys(saes.layers, 0.0)
    sumsq = dict.fromkeys(saes.layers, 0.0)
    active = dict.fromkeys(saes.layers, 0.0)
    total = {i: torch.zeros(lm.d_model, dtype=torch.float64) for i in saes.layers}
    state = {"n": 0}

    def sink(layer: int, hidden: torch.Tensor) -> None:
        layer_sae = saes.layers[layer]
        # a few hundred tokens at a time: dense codes of a whole batch would be the run's memory peak
        for x in hidden[state["keep"]].double().split(QUALITY_CHUNK_TOKENS):
            codes = layer_sae.encode(x.float())
            sse[layer] += ((x - layer_sae.sae.decode(codes).double()) ** 2).sum().item()
            sumsq[layer] += (x**2).sum().item()
            total[layer] += x.sum(0).cpu()
            active[layer] += (codes > 0).sum().item()

    with torch.inference_mode(), ResidualCapture(lm, sorted(saes.layers), sink) as cap:
        for batch in iter_batches(sentences, lm.tokenizer, batch_tokens, max_length):
            state["keep"] = batch.keep.to(lm.device)
            cap.run(batch)
            state["n"] += int(state["keep"].sum())
    n = max(state["n"], 1)
    for layer, s in saes.layers.items():
        variance = sumsq[layer] - total[layer].norm().item() ** 2 / n
        s.fve = 1.0 - sse[layer] / variance if variance > 0 else math.nan
        s.l0 = active[layer] / n
        if s.mean is None:
            s.mean = (total[layer] / n).float().to(lm.device)
            s.mean_source = "held-out sentences of the run's corpus (all languages)"


def print_quality(saes: SAESet, console: Console) -> None:
    table = Table(title=f"SAE quality on held-out sentences ({saes.source})")
    table.add_column("layer", justify="right")
    table.add_column("d_sae", justify="right")
    table.add_column("variance explained", justify="right")
    table.add_column("mean L0", justify="right")
    for layer, s in sorted(saes.layers.items()):
        table.add_row(str(layer), str(s.d_sae), f"{s.fve:.3f}", f"{s.l0:.1f}")
    console.print(table)
