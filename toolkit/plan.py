"""`--dry-run`: the resolved config and the derived facts of a stage, without loading a model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from rich.console import Console
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table

from toolkit import corpus as corpora
from toolkit import stages
from toolkit.config import Config, cache_dir
from toolkit.errors import UserError
from toolkit.layers import parse_layers

KNOWN_LAYERS = {"embedded": (18, 640), "tiny": (26, 64), "google/gemma-2-2b": (26, 2304)}
ASSUMED_L0 = 64  # for the disk estimate before any SAE is measured


def model_shape(cfg: Config) -> tuple[int, int] | None:
    """(layers, width) from a local config.json or the known presets; None when only the hub knows."""
    name = cfg.model.name
    candidates = [Path(name) / "config.json"]
    if name == "embedded":
        candidates.append(cache_dir() / "models" / "gemma-3-270m-1.0.0" / "config.json")
    for path in candidates:
        if path.is_file():
            c = json.loads(path.read_text())
            return c["num_hidden_layers"], c["hidden_size"]
    return KNOWN_LAYERS.get(name)


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
    console.print(Panel(Syntax(yaml.safe_dump(cfg.to_dict(), sort_keys=False), "yaml"),
                        title=f"resolved config ({stage}, preset {cfg.run.preset})"))
    if stage != "pipeline" and not stages.get(stage).reads_corpus:
        return  # the table below is about the corpus a stage reads
    langs = cfg.lang_codes
    corpus = corpora.load(cfg.run.corpus, langs, cfg.run.max_sentences)
    check_corpus(cfg, corpus)
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
    table.add_row("[bold]total", f"{len(texts) * len(langs):,}", f"{total_tokens:,}",
                  str(cfg.extract.shards * len(langs)), human_bytes(total_bytes if per_token else None))
    console.print(table)
    facts = [
        f"model: {cfg.model.name} ({n_layers or '?'} layers, width {d_model or '?'})",
        f"layers: {layers if layers is not None else cfg.run.layers}",
        f"SAEs: {cfg.sae.source}" + (f" (release {cfg.sae.release})" if cfg.sae.release else ""),
        f"bytes per token: {per_token:,} (assuming L0 {ASSUMED_L0} per layer)" if per_token else
        "bytes per token: unknown until the model config is on disk",
        f"batches of at most {cfg.extract.batch_tokens:,} padded tokens; executor {cfg.run.executor}",
        f"output: {cfg.run_dir / 'activations'}",
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


def check_corpus(cfg: Config, corpus: corpora.Corpus) -> None:
    """What the config asks of the corpus, checked before any job starts."""
    if cfg.extract.shards > len(corpus.ids):
        raise UserError(f"extract.shards: {cfg.extract.shards} shards for {len(corpus.ids)} sentences per language; "
                        f"pass --shards {max(1, len(corpus.ids))} or fewer")


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
