"""`--dry-run`: the resolved config and the derived facts of a stage, without loading a model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import yaml
from rich.console import Console
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table

from toolkit import corpus as corpora
from toolkit import stages
from toolkit.config import Config, cache_dir
from toolkit.layers import aligned_layers, parse_layers
from toolkit.rundir import RunDir

if TYPE_CHECKING:
    from toolkit.align.data import Split
    from toolkit.calibration import Rates
    from toolkit.corpus import Corpus

KNOWN_LAYERS = {"embedded": (18, 640), "tiny": (26, 64), "google/gemma-2-2b": (26, 2304)}
ASSUMED_L0 = 64  # for the disk estimate before any SAE is measured


def model_config(cfg: Config) -> dict | None:
    """The model's config.json when it is on disk (a local folder, the assembled embedded or the built tiny model)."""
    name = cfg.model.name
    candidates = [Path(name) / "config.json"]
    if name in ("embedded", "tiny"):
        built = "gemma-3-270m-1.0.0" if name == "embedded" else "tiny-gemma2-v1"
        candidates.append(cache_dir() / "models" / built / "config.json")
    return next((json.loads(path.read_text()) for path in candidates if path.is_file()), None)


def model_shape(cfg: Config) -> tuple[int, int] | None:
    """(layers, width) from a local config.json or the known presets; None when only the hub knows."""
    c = model_config(cfg)
    return (c["num_hidden_layers"], c["hidden_size"]) if c else KNOWN_LAYERS.get(cfg.model.name)


def linear_head(cfg: Config) -> bool:
    """Whether the LM head's logits are a plain product (no soft-capping, as Gemma 2 has): alignment can then
    summarise the base side of its English KL (`toolkit.align.objective.EnglishReference`)."""
    return not (model_config(cfg) or {}).get("final_logit_softcapping")


def _tokenizer(cfg: Config):
    """The model's tokenizer when it is on disk already; None means estimate from characters."""
    from transformers import AutoTokenizer

    from toolkit import models

    if cfg.model.name == "tiny":
        return AutoTokenizer.from_pretrained(str(models.tiny_dir()))
    path = cache_dir() / "models" / "gemma-3-270m-1.0.0" if cfg.model.name == "embedded" else Path(cfg.model.name)
    if (path / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(path))
    return None


def show(cfg: Config, stage: str, console: Console) -> None:
    console.print(
        Panel(
            Syntax(yaml.safe_dump(cfg.to_dict(), sort_keys=False), "yaml"),
            title=f"resolved config ({stage}, preset {cfg.run.preset})",
        )
    )
    if stage == "evaluate":
        show_estimate(console, *evaluate_plan(cfg))
    if stage != "pipeline" and (stage not in stages.job_stages() or not stages.get(stage).reads_corpus):
        return  # the plans below are about the corpus a stage reads
    if stage == "align":
        show_estimate(console, *align_plan(cfg))
        return
    show_extract_table(cfg, console)
    if stage in ("extract", "pipeline", "train-saes"):
        show_estimate(console, *extract_plan(cfg, stage))


def show_extract_table(cfg: Config, console: Console) -> None:
    """Sentences, tokens, jobs and disk per language, and the facts they derive from."""
    langs = cfg.lang_codes
    corpus = corpora.load(cfg.run.corpus, langs, cfg.run.max_sentences)
    stages.check_shards(cfg.extract.shards, len(corpus.ids))
    shape = model_shape(cfg)
    tokenizer = _tokenizer(cfg)
    table = Table(title=f"plan: {corpus.name}, {len(corpus.ids):,} parallel sentences")
    for col in ("language", "sentences", "tokens", "jobs", "disk"):
        table.add_column(col, justify="right" if col != "language" else "left")
    n_layers, d_model = shape if shape else (None, None)
    layers = parse_layers(cfg.run.layers, n_layers) if n_layers else None
    per_token = bytes_per_token(cfg, layers, d_model) if layers else None
    total_tokens = total_bytes = 0
    for lang in langs:
        texts = corpus.texts[lang]
        tokens = count_tokens(cfg, texts, tokenizer)
        shown = f"{tokens:,}" if tokenizer is not None else f"~{tokens:,}"
        disk = tokens * per_token if per_token else None
        total_tokens += tokens
        total_bytes += disk or 0
        table.add_row(lang, f"{len(texts):,}", shown, str(cfg.extract.shards), human_bytes(disk))
    table.add_row(
        "[bold]total",
        f"{len(texts) * len(langs):,}",
        f"{total_tokens:,}",
        str(cfg.extract.shards * len(langs)),
        human_bytes(total_bytes if per_token else None),
    )
    console.print(table)
    facts = [
        f"model: {cfg.model.name} ({n_layers or '?'} layers, width {d_model or '?'})",
        f"layers: {layers if layers is not None else cfg.run.layers}",
        f"SAEs: {cfg.sae.source}" + (f" (release {cfg.sae.release})" if cfg.sae.release else ""),
        f"bytes per token: {per_token:,} (assuming L0 {ASSUMED_L0} per layer)"
        if per_token
        else "bytes per token: unknown until the model config is on disk",
        f"batches of at most {cfg.extract.batch_tokens:,} padded tokens; executor {cfg.run.executor}",
        f"output: {RunDir(cfg.run_dir).activations}",
    ]
    console.print(Panel("\n".join(facts), title="derived"))


def free_bytes(folder: str | Path) -> int:
    """Free bytes on the filesystem that holds (or will hold) `folder`."""
    folder = Path(folder).absolute()
    return shutil.disk_usage(next(p for p in (folder, *folder.parents) if p.exists())).free


def disk_estimate(cfg: Config) -> int | None:
    """The --dry-run's disk estimate of the whole extraction; None when it cannot be made."""
    try:
        shape = model_shape(cfg)
        if shape is None:
            return None
        corpus = corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)
        layers = parse_layers(cfg.run.layers, shape[0])
        tokenizer = _tokenizer(cfg)
        return sum(disk_needed(cfg, corpus.texts[lang], tokenizer, layers, shape[1]) for lang in cfg.lang_codes)
    except Exception:  # only ever called to word another error: an estimate that fails is left out
        return None


def count_tokens(cfg: Config, texts: list[str], tokenizer=None) -> int:
    """Kept tokens of `texts` (BOS removed); about a quarter of the characters without a tokenizer."""
    if tokenizer is None:
        return sum(len(t) for t in texts) // 4
    from toolkit.capture import tokenize

    return sum(len(t) - 1 for t in tokenize(tokenizer, texts, cfg.extract.max_length))


def disk_needed(cfg: Config, texts: list[str], tokenizer, layers: list[int], d_model: int) -> int:
    """The dry-run's disk estimate for these sentences (about the peak: the parts and the final file)."""
    return count_tokens(cfg, texts, tokenizer) * bytes_per_token(cfg, layers, d_model)


def bytes_per_token(cfg: Config, layers: list[int], d_model: int) -> int:
    value = 2 if cfg.extract.code_dtype == "float16" else 4
    per_layer = 8 + ASSUMED_L0 * (4 + value) + (4 * d_model if cfg.extract.save_resid else 0)
    return 8 + len(layers) * per_layer


def human_bytes(n: float | None) -> str:
    """1536 -> '1.5 KB'; None -> '?'."""
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"


# ------------------------------------------------------------------------------------------- estimates ---
# Each stage's plan is counted from the config and the corpus, then timed with the machine's calibrated rates
# (toolkit.calibration). They are estimates: the method is printed with them.

Plan = tuple[str, list[str], float | None]  # title, lines, estimated seconds (None: no calibration)


def show_estimate(console: Console, title: str, lines: list[str], seconds: float | None) -> None:
    from toolkit import calibration

    if seconds is None:
        lines = [*lines, "estimated wall time: unknown until the model is on disk (its first run assembles it)"]
    else:
        lines = [
            *lines,
            f"[bold]estimated wall time: {human_seconds(seconds)}[/] on this machine ({calibration.METHOD})",
        ]
    console.print(Panel("\n".join(lines), title=title, title_align="left"))


def human_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _rates(cfg: Config, tokenizer):
    """The calibrated rates, measured now (a few seconds) when the model is on disk (its tokenizer is) and none
    are cached; None when neither."""
    from toolkit import calibration

    return calibration.rates(cfg, measure=tokenizer is not None)


def _mean_tokens(cfg: Config, texts: list[str], tokenizer) -> float:
    return count_tokens(cfg, texts, tokenizer) / max(len(texts), 1)


def sae_width(cfg: Config) -> int:
    """Features per layer the stage will encode with: local training's width, else Gemma Scope's 16k."""
    return cfg.sae.trained_width() if cfg.sae.source in ("auto", "train") else 16384


def extract_plan(cfg: Config, stage: str) -> Plan:
    """extract: sentences, tokens and disk (above), the local SAE training when it applies, and the time."""
    from toolkit import models, sae_training
    from toolkit.corpus import is_heldout
    from toolkit.sae_source import SAESource

    corpus = corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)
    tokenizer = _tokenizer(cfg)
    shape = model_shape(cfg)
    layers = parse_layers(cfg.run.layers, shape[0]) if shape else []
    rates = _rates(cfg, tokenizer)
    tokens = sum(count_tokens(cfg, corpus.texts[lang], tokenizer) for lang in cfg.lang_codes)
    lines, seconds = [], 0.0
    trains = SAESource.parse(cfg.sae.source).kind in ("train", "auto") or stage == "train-saes"
    if trains and tokenizer is not None:
        train_on = corpus if not cfg.sae.train_corpus else corpora.load(cfg.sae.train_corpus, cfg.lang_codes, 0)
        available = sum(
            s.n_tokens
            for s in sae_training.training_sample(train_on, cfg.sae.train_mix, tokenizer, 2**62, cfg.extract.max_length)
        )
        size = sae_training.sizes(cfg.sae, available)
        held = sum(
            count_tokens(
                cfg,
                train_on.subset([i for i in train_on.ids if is_heldout(i)] or train_on.ids[:1]).texts[lang],
                tokenizer,
            )
            for lang in train_on.langs
        )
        lines.append(
            f"SAE training ({cfg.sae.arch}, {cfg.sae.budget} budget, mix {cfg.sae.train_mix}): "
            f"{size.distinct:,} tokens per layer from one shared forward pass, {size.samples:,} training "
            f"samples per layer, width {size.width:,}, {len(layers)} layers; quality measured on "
            f"{held:,} held-out tokens"
            + ("" if cfg.sae.source == "train" or stage == "train-saes" else " (when the hub's SAEs cannot be had)")
        )
        if rates:  # extract shares its own forward pass with the training (toolkit.capture.shared_forward)
            passes = (size.distinct + held) / rates.decoder_tps if stage == "train-saes" else 0.0
            workers = sae_training.training_workers(models.resolve_device(cfg.model.device), len(layers))
            seconds += passes + len(layers) * size.samples / rates.sae_sps / workers
    if stage != "train-saes":
        width = sae_width(cfg)
        lines.append(f"extraction: {tokens:,} tokens through {len(layers)} layers and SAEs of {width:,} features")
        if rates:
            seconds += tokens * (1 / rates.decoder_tps + len(layers) * width * rates.encode_s)
    return f"plan: {stage}", lines, seconds if rates else None


def align_plan(cfg: Config) -> Plan:
    """align: training pairs, steps, held-out ids per target, and the time of training and measuring."""
    from toolkit.align.data import ids_hash, split_ids
    from toolkit.languages import REFERENCE
    from toolkit.stages import align_targets

    corpus = corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)
    split = split_ids(corpus.ids, cfg.align.heldout, cfg.align.val_fraction, cfg.run.seed)
    targets = align_targets(cfg)
    a = cfg.align
    pairs_per_step = a.batch_size * a.grad_accum
    shown = ", ".join(split.heldout[:6]) + (", ..." if len(split.heldout) > 6 else "")
    lines = [
        f"targets: {', '.join(targets)}" + (" (one joint adapter)" if a.joint else " (one adapter each)"),
        f"pairs: {len(split.train):,} training, {len(split.val):,} validation sentence pairs with {REFERENCE} "
        f"(of {len(corpus.ids):,} ids)",
        f"steps: {a.steps:,} per adapter x {pairs_per_step} pairs = {a.steps * pairs_per_step:,} pairs "
        f"({a.steps * pairs_per_step / max(len(split.train), 1):.1f} epochs); checkpoint every {a.checkpoint_every}",
        f"held-out ids ({len(split.heldout)}, sha256 {ids_hash(split.heldout)[:12]}): {shown}; measured before "
        f"and after in all {len(cfg.lang_codes)} languages",
    ]
    tokenizer = _tokenizer(cfg)
    rates = _rates(cfg, tokenizer)
    if rates is None:
        return "plan: align", lines, None
    phases = align_phases(cfg, rates, tokenizer, corpus, split, targets)
    lines += [
        "time by phase, from this machine's calibrated rates:",
        *(f"  {phase.name}: {human_seconds(phase.seconds)}, {phase.method}" for phase in phases),
    ]
    return "plan: align", lines, sum(phase.seconds for phase in phases)


class Phase(NamedTuple):
    name: str
    seconds: float
    method: str  # what is counted, at which calibrated rate


def align_phases(cfg: Config, rates: Rates, tokenizer, corpus: Corpus, split: Split, targets: list[str]) -> list[Phase]:
    """The align job's phases, as `jobs/align.py` runs them: load the model and SAEs; per adapter, the base model's
    English reference (`EnglishReference.fill`), the training steps and validations; the held-out measurement of the
    base model (once) and of each adapter (`toolkit.align.metrics.before_after`)."""
    from toolkit.align.objective import SUMMARY_USES, make_term, reference_uses
    from toolkit.languages import REFERENCE

    a = cfg.align
    n_layers = model_shape(cfg)[0]
    measured, aligned = parse_layers(cfg.run.layers, n_layers), aligned_layers(a.align_layers, n_layers)
    width = sae_width(cfg)
    units = [targets] if a.joint else [[t] for t in targets]
    pairs = a.batch_size * a.grad_accum  # per target language and step
    train, val, held = (corpus.subset(ids) for ids in (split.train, split.val, split.heldout))

    def extraction(tokens: float, layers: list[int]) -> float:  # the decoder, then each layer's SAE encode
        return tokens * (1 / rates.decoder_tps + len(layers) * width * rates.encode_s)

    load = rates.startup_s + rates.load_s + len(set(measured) | set(aligned)) * rates.sae_load_s
    english = _mean_tokens(cfg, train.texts[REFERENCE], tokenizer)
    val_english = _mean_tokens(cfg, val.texts[REFERENCE], tokenizer)
    term_layers = aligned if make_term(a.objective).uses_saes else []
    checkpoints = set(range(a.checkpoint_every, a.steps + 1, a.checkpoint_every))
    validations = len(checkpoints | {a.steps}) if split.val else 0
    norm_steps = len(checkpoints | {1})  # the trainer's three extra backward passes for gradient norms
    reference = training = validation = 0.0
    read, summarised, recomputed = 0.0, False, False
    for unit in units:
        # each target draws its own epoch permutations of the training ids (`batch_ids`); English is shared
        n, drawn = len(split.train), min(a.steps * pairs, len(split.train))
        sentences = n * (1 - (1 - drawn / n) ** len(unit)) + len(split.val)
        keep = a.lambda_keep > 0
        summary = keep and reference_uses(a, n, len(unit)) >= SUMMARY_USES and linear_head(cfg)
        per_use = english / rates.head_tps if keep and not summary else 0.0  # base logits of English, each use
        read += sentences
        summarised, recomputed = summarised or summary, recomputed or bool(per_use)
        reference += extraction(sentences * english, term_layers) + (
            2 * sentences * english / rates.head_tps if summary else 0.0
        )
        for lang in unit:
            step = pairs * ((_mean_tokens(cfg, train.texts[lang], tokenizer) + english) / rates.train_tps + per_use)
            training += step * (a.steps + 2 * norm_steps)  # three backward passes, about two steps' worth
            pair = (_mean_tokens(cfg, val.texts[lang], tokenizer) + val_english) / rates.lm_tps
            validation += validations * len(split.val) * (pair + (val_english / rates.head_tps if per_use else 0.0))
    held_tokens = {lang: count_tokens(cfg, held.texts[lang], tokenizer) for lang in cfg.lang_codes}

    def measurement(quality: list[str]) -> float:
        """Every language's extraction and bits per byte (the model with its LM head), and the SAE fidelity of
        the `quality` languages (another pass through decoder and SAEs)."""
        return sum(extraction(n, measured) + n / rates.lm_tps for n in held_tokens.values()) + sum(
            extraction(held_tokens.get(lang, 0), measured) for lang in quality
        )

    kl = 2 * held_tokens.get(REFERENCE, 0) / rates.lm_tps  # the adapted and base logits of English
    before_after = measurement([*targets, REFERENCE]) + sum(measurement([*u, REFERENCE]) + kl for u in units)
    return [
        Phase("load", load, f"libraries, model and {len(set(measured) | set(aligned))} SAEs, each load timed once"),
        Phase(
            "English reference",
            reference,
            f"{read:,.0f} English training and validation sentences through the base model and the term's "
            f"{len(term_layers)} SAEs"
            + (", with the KL's summaries (2 LM-head products a token)" if summarised else ""),
        ),
        Phase(
            "training",
            training,
            f"{a.steps} steps x {len(units)} adapter(s) x {pairs} pairs at the forward+backward rate, {norm_steps} "
            "of them with gradient norms (3 more backward passes)"
            + (", English base logits each use at the LM-head rate" if recomputed else ""),
        ),
        Phase("validation", validation, f"{validations} x {len(split.val)} pairs through the model with its LM head"),
        Phase(
            "before/after",
            before_after,
            f"{sum(held_tokens.values()):,} held-out tokens, base model and {len(units)} adapter(s): extraction, "
            "bits per byte with the LM head, SAE fidelity of targets and English, English KL",
        ),
    ]


def evaluate_plan(cfg: Config) -> Plan:
    """evaluate: items x languages x models, and the time of scoring them (each context once) and bits per byte."""
    from toolkit.evaluation import benchdata, tasks

    benches = tasks.parse_tasks(cfg.eval.tasks)
    adapters = len(adapter_dirs(cfg))
    models = 1 + adapters - (1 if cfg.eval.no_base and adapters else 0)
    lines, items, tokens = [], 0, 0.0
    tokenizer = _tokenizer(cfg)
    if not cfg.eval.bench_data:
        lines.append("benchmark items: from the hub (counted when they are downloaded; pass --bench-data DIR)")
    for bench_task in tasks.plan(benches, cfg.lang_codes, cfg.eval.bench_data) if cfg.eval.bench_data else []:
        if not bench_task.ok:
            lines.append(f"{bench_task.bench} {bench_task.lang}: missing ({bench_task.missing})")
            continue
        records = benchdata.read_records(bench_task.files["test"])
        n = min(cfg.eval.limit, len(records)) if cfg.eval.limit else len(records)
        sample = [" ".join(str(v) for k, v in r.items() if k not in ("id", "ind", "answer")) for r in records[:50]]
        items += n
        tokens += n * (_mean_tokens(cfg, sample, tokenizer) if sample else 0)
    n_langs = len(cfg.lang_codes)
    lines.insert(
        0,
        f"items: {items:,} in all = {', '.join(benches)} x {n_langs} languages "
        f"({cfg.eval.limit or 'all'} per task and language) x {models} model(s)",
    )
    bpb = cfg.eval.bpb_sentences * n_langs
    lines.append(f"bits per byte: {cfg.eval.bpb_sentences} held-out sentences x {n_langs} languages per model")
    rates = _rates(cfg, tokenizer)
    if rates is None:
        return "plan: evaluate", lines, None
    corpus = corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)
    sentence = _mean_tokens(cfg, [t for lang in cfg.lang_codes for t in corpus.texts[lang]], tokenizer)
    # each context is scored once and the LM head runs only where a choice is scored; bits per byte need it everywhere
    seconds = models * (tokens / rates.decoder_tps + bpb * sentence / rates.lm_tps)
    lines.append("time: each item's text (question and choices) once through the model; bits per byte with its LM head")
    return "plan: evaluate", lines, seconds


def adapter_dirs(cfg: Config) -> list[Path]:
    """The adapters `evaluate` scores beside the base model: --adapter, else the run's (`RunDir.adapters`)."""
    if cfg.model.adapter:
        return [Path(cfg.model.adapter)]
    return list(RunDir(cfg.run_dir).adapters(points=cfg.eval.sweep_points).values())
