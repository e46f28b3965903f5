"""Align job: activation-aware LoRA adapters for the weak languages, then before/after on held-out text.

One unit is one target language (`RUN/align/{lang}`), or all targets at once with `--joint`
(`RUN/align/joint`); `run` takes several so a laptop loads the model and SAEs once, while a Slurm
array task can take one language (`run(cfg, langs=[lang])`). Per unit:

1. split the parallel corpus by sentence id (seeded): held-out ids for the measurement, validation
   ids, training ids — disjoint (`toolkit.align.split_ids`);
2. layer weights from T's measured gap: RUN/reports/gaps.csv, else RUN/activations/*.h5 (training and
   validation ids only), else measured on up to GAP_SENTENCES training sentences;
3. train (`toolkit.align.train`; resumable, checkpointed), adapter in peft format in `adapter/`;
4. extract the held-out sentences of every language of the run with the base model (once per run and
   split, in `RUN/align/base-{key}/`) and with the saved adapter (`RUN/align/{unit}/after/`), through
   jobs.extract, plus LM perplexity; report activation gain, English retention, collateral effects
   and perplexity (Rich table and `before_after.json`).

A(L, l) = mean over held-out sentences of the per-sentence mean activation mass (the extraction
statistic `mass`); gain(L, l) = 100 (A_after - A_before) / A_before; retention = 100 A_after / A_before;
headline numbers are means over the measured layers (`run.layers`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from jobs import extract
from toolkit import align, models
from toolkit import corpus as corpora
from toolkit import saes as sae_sources
from toolkit.capture import iter_batches
from toolkit.config import Config, parse_layers
from toolkit.corpus import Corpus
from toolkit.errors import UserError
from toolkit.rundir import RunDir
from toolkit.store import ActivationFile

REFERENCE = align.REFERENCE
GAP_SENTENCES = 64  # training sentences per language when no gaps were measured before
PPL_BATCH_TOKENS = 1024  # logits over a 262k vocabulary are ~1 MB per token in float32


@dataclass
class Unit:
    name: str  # language code, or "joint"
    targets: list[str]


def targets(cfg: Config, langs: list[str] | None = None) -> list[str]:
    """`langs`, else `align.targets`, else every non-English language of the run."""
    chosen = langs or [t.strip() for t in cfg.align.targets.split(",") if t.strip()]
    chosen = chosen or [lang for lang in cfg.lang_codes if lang != REFERENCE]
    for lang in chosen:
        if lang == REFERENCE:
            raise UserError("align.targets: English is the reference, not a target language")
        if lang not in cfg.lang_codes:
            raise UserError(f"align.targets: {lang!r} is not among the run's languages ({','.join(cfg.lang_codes)}); "
                            "add it to --langs")
    if not chosen:
        raise UserError("align: no target language; pass --langs with at least one language besides en")
    return chosen


def units(cfg: Config, langs: list[str] | None = None) -> list[Unit]:
    chosen = targets(cfg, langs)
    return [Unit("joint", chosen)] if cfg.align.joint else [Unit(lang, [lang]) for lang in chosen]


def run(cfg: Config, console: Console | None = None, langs: list[str] | None = None) -> list[dict]:
    """Train and measure one adapter per target language (or one joint adapter); returns a summary per unit."""
    engine = align.resolve_engine(cfg.align.engine)
    dist = align.setup_distributed(engine, cfg.model.device)
    console = (console or Console(stderr=True)) if dist.main else Console(quiet=True)
    todo = units(cfg, langs)
    corpus = corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)
    if dist.main:
        RunDir(cfg.run_dir).write_manifest(cfg, "align", corpus.hash)
    lm = models.load(cfg.model)
    measured = parse_layers(cfg.run.layers, lm.n_layers)
    aligned = parse_layers(cfg.align.align_layers, lm.n_layers)
    saes = sae_sources.load(cfg, lm, sorted(set(measured) | set(aligned)), corpus, console)
    split = align.split_ids(corpus.ids, cfg.align.heldout, cfg.align.val_fraction, cfg.run.seed)
    show_plan(cfg, todo, split, engine, dist, aligned, console)
    return [align_unit(cfg, lm, saes, corpus, unit, split, dist, engine, console) for unit in todo]


def show_plan(cfg: Config, todo: list[Unit], split: align.Split, engine: str, dist: align.Dist, aligned: list[int],
              console: Console) -> None:
    a = cfg.align
    pairs = a.batch_size * a.grad_accum * dist.world
    facts = [
        f"units: {', '.join(u.name for u in todo)}" + (f" (targets {'+'.join(todo[0].targets)})" if a.joint else ""),
        f"split (seed {cfg.run.seed}): {len(split.train)} train, {len(split.val)} validation, "
        f"{len(split.heldout)} held-out sentence ids (disjoint)",
        f"engine: {engine}, {dist.world} process(es); {a.steps} steps x {pairs} sentence pairs per language "
        f"({a.batch_size} x {a.grad_accum} accumulation x {dist.world} ranks)",
        f"LoRA r={a.lora_r} alpha={a.lora_alpha} dropout={a.lora_dropout} on {a.lora_targets} (layers {a.lora_layers})",
        f"loss = CE + {a.lambda_align} x align({a.distance}, {len(aligned)} layers, {a.layer_weights} weights) "
        f"+ {a.lambda_keep} x KL(base || adapted) on English",
        f"output: {cfg.run_dir / 'align'}",
    ]
    console.print(Panel("\n".join(facts), title="align plan"))


def align_unit(cfg: Config, lm: models.LoadedModel, saes: sae_sources.SAESet, corpus: Corpus, unit: Unit,
               split: align.Split, dist: align.Dist, engine: str, console: Console) -> dict:
    """Train (or resume, or reuse) one adapter, then measure it against the base model (rank 0)."""
    folder = RunDir(cfg.run_dir).align(unit.name)
    aligned = parse_layers(cfg.align.align_layers, lm.n_layers)
    fingerprint = align.fingerprint(cfg, lm, saes, unit.targets, split, engine, dist.world)
    metrics = _finished(folder, cfg, fingerprint)
    if metrics is not None:
        console.print(f"[bold]{unit.name}:[/] adapter already trained ({folder / 'adapter'}); measuring only")
    else:
        state = align.latest_state(folder)
        if state and state.get("fingerprint") == fingerprint:
            weights, info = state["weights"], {}
        else:
            gaps, sources = {}, {}
            for lang in unit.targets:
                gaps[lang], sources[lang] = layer_gaps(cfg, lm, saes, corpus, lang, aligned, split, dist)
            weights = {lang: align.weights_from_gaps(gaps[lang], aligned, cfg.align.layer_weights)
                       for lang in unit.targets}
            info = {"gaps": gaps, "gap_source": sources}
            _print_weights(weights, gaps, sources, console)
        result = align.train(cfg, lm, saes, corpus, unit.targets, split, weights, folder, dist, engine, console, info)
        lm.model = result.model.unload()  # the base model again, for the next unit and the measurement
        metrics = result.metrics
    summary = {"unit": unit.name, "targets": unit.targets, "adapter": str(folder / "adapter"),
               "metrics": str(folder / "metrics.json"), "final": metrics.get("final"),
               "final_validation": metrics.get("final_validation")}
    if not dist.main:
        return summary
    if not split.heldout:
        console.print(f"[yellow]{unit.name}:[/] no held-out sentences (align.heldout=0): before/after skipped")
        return summary
    report = before_after(cfg, lm, saes, corpus, unit, split, folder, console)
    summary.update(before_after=str(folder / "before_after.json"),
                   gain_pct={lang: v["gain_pct_mean"] for lang, v in report["languages"].items()},
                   english_retention_pct=report["english_retention_pct"])
    return summary


def _finished(folder: Path, cfg: Config, fingerprint: str) -> dict | None:
    path = folder / "metrics.json"
    if not path.is_file() or not (folder / "adapter" / "adapter_model.safetensors").is_file():
        return None
    metrics = json.loads(path.read_text())
    done = metrics.get("complete") and metrics.get("step") == cfg.align.steps
    return metrics if done and metrics.get("fingerprint") == fingerprint else None


def _print_weights(weights: dict, gaps: dict, sources: dict, console: Console) -> None:
    table = Table(title="alignment layer weights")
    table.add_column("layer", justify="right")
    for lang in weights:
        table.add_column(f"{lang} gap %", justify="right")
        table.add_column(f"{lang} w", justify="right")
    for layer in next(iter(weights.values())):
        cells = [str(layer)]
        for lang in weights:
            cells += [f"{gaps[lang].get(layer, math.nan):+.1f}" if gaps[lang] else "-", f"{weights[lang][layer]:.2f}"]
        table.add_row(*cells)
    table.caption = ("w_l = max(0, -gap_l), scaled to mean 1; gaps from "
                     + "; ".join(f"{lang}: {src}" for lang, src in sources.items()))
    console.print(table)


# ----------------------------------------------------------------------------------------------- gaps


def layer_gaps(cfg: Config, lm: models.LoadedModel, saes: sae_sources.SAESet, corpus: Corpus, lang: str,
               layers: list[int], split: align.Split, dist: align.Dist) -> tuple[dict[int, float], str]:
    """T's mass gap to English per layer and where it came from; rank 0 decides, the others follow."""
    found: list = [None]
    if dist.main:
        gaps = align.gaps_from_csv(cfg.run_dir / "reports" / "gaps.csv", lang, layers)
        source = "reports/gaps.csv"
        if gaps is None:
            gaps = align.gaps_from_activations(cfg.run_dir, lang, layers, ids=split.train + split.val)
            source = "activations/*.h5 (training and validation ids)"
        if gaps is None:
            ids = split.train[:GAP_SENTENCES]
            sub = corpus.subset(ids)
            a_lang = mean_mass(cfg, lm, saes, sub.sentences(lang), layers)
            a_ref = mean_mass(cfg, lm, saes, sub.sentences(REFERENCE), layers)
            gaps = {layer: align.gap_pct(a_lang[layer], a_ref[layer]) for layer in layers}
            source = f"measured on {len(ids)} training sentences"
        found = [(gaps, source)]
    if dist.world > 1:
        torch.distributed.broadcast_object_list(found, src=0)
    return found[0]


def mean_mass(cfg: Config, lm: models.LoadedModel, saes: sae_sources.SAESet, sentences: list[tuple[str, str]],
              layers: list[int]) -> dict[int, float]:
    """A(L, l) over `sentences`: mean of the per-sentence mean activation mass, as extraction stores it."""
    per_layer: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    for batch in iter_batches(sentences, lm.tokenizer, cfg.extract.batch_tokens, cfg.extract.max_length):
        encoded = extract.encode_batch(lm, saes, batch, layers, save_resid=False)
        for layer in layers:
            per_layer[layer].append(encoded.layers[layer].mass)
    return {layer: float(np.concatenate(v).mean()) for layer, v in per_layer.items()}


# ---------------------------------------------------------------------------------------- before/after


def before_after(cfg: Config, lm: models.LoadedModel, saes: sae_sources.SAESet, corpus: Corpus, unit: Unit,
                 split: align.Split, folder: Path, console: Console) -> dict:
    """Held-out activations and perplexity of every run language, base vs adapted; table + before_after.json."""
    from filelock import FileLock
    from peft import PeftModel

    adapter = folder / "adapter"
    sha = align.adapter_sha(adapter)
    out_path = folder / "before_after.json"
    layers = parse_layers(cfg.run.layers, lm.n_layers)
    if out_path.is_file():
        cached = json.loads(out_path.read_text())
        if (cached.get("adapter_sha256") == sha and cached.get("heldout_sha256") == align.ids_hash(split.heldout)
                and set(cached["languages"]) == set(corpus.langs) and cached["layers"] == layers):
            print_before_after(cached, console)
            return cached
    held = corpus.subset(split.heldout)
    key = hashlib.sha256(json.dumps([lm.model_id, saes.ids, layers, align.ids_hash(split.heldout), held.hash,
                                     cfg.extract.max_length]).encode()).hexdigest()[:12]
    base_dir = cfg.run_dir / "align" / f"base-{key}"
    base_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]{unit.name}:[/] measuring {len(held.ids)} held-out sentences per language, base model")
    with FileLock(str(base_dir) + ".lock"):  # array tasks of one run share the base measurement
        before = measure(cfg, lm, saes, held, layers, base_dir, console)
    console.print(f"[bold]{unit.name}:[/] measuring with the adapter {adapter}")
    peft_model = PeftModel.from_pretrained(lm.model, str(adapter)).eval()
    adapted = dataclasses.replace(lm, model=peft_model, model_id=f"{lm.model_id} + adapter {sha}")
    try:
        after = measure(cfg.merged({"model": {"adapter": str(adapter)}}), adapted, saes, held, layers,
                        folder / "after", console, fresh=True)
    finally:
        lm.model = peft_model.unload()
    report = compare(before, after, layers, unit.targets)
    report.update(unit=unit.name, adapter=str(adapter), adapter_sha256=sha, heldout_sentences=len(held.ids),
                  heldout_sha256=align.ids_hash(split.heldout), before_dir=str(base_dir),
                  after_dir=str(folder / "after"), definitions=DEFINITIONS)
    align.write_json(out_path, report)
    print_before_after(report, console)
    return report


DEFINITIONS = {
    "A": "mean over held-out sentences of the per-sentence mean (over tokens, BOS and padding excluded) of the "
         "summed SAE feature activations at the layer",
    "gain_pct": "100 * (A_after - A_before) / A_before per layer; gain_pct_mean averages the layers (the headline), "
                "gain_pct_median is their median, gain_pct_pooled the gain of A summed over layers",
    "retention_pct": "100 * A_after / A_before per layer; english_retention_pct is English's, averaged over layers",
    "ppl": "exp of the mean next-token cross-entropy over the held-out sentences' real tokens",
}


def measure(cfg: Config, lm: models.LoadedModel, saes: sae_sources.SAESet, corpus: Corpus, layers: list[int],
            folder: Path, console: Console, fresh: bool = False) -> dict[str, dict]:
    """Extract every language of `corpus` into `folder/activations` (resumable; `fresh` starts over)
    and return A per layer and the perplexity per language (cached in `folder/perplexity.json`)."""
    # float32 codes: an adapter may push activations past float16's range, and these files are small
    sub_cfg = cfg.merged({"run": {"run": str(folder)},
                          "extract": {"shards": 1, "overwrite": fresh, "code_dtype": "float32"}})
    ppl_path = folder / "perplexity.json"
    ppl = {} if fresh or not ppl_path.is_file() else json.loads(ppl_path.read_text())
    out = {}
    for lang in corpus.langs:
        summary = extract.extract_unit(sub_cfg, lm, saes, corpus, extract.Unit(lang), layers, console)
        with ActivationFile(summary.path) as f:
            a = {layer: float(f.stats(layer, "mass").mean()) for layer in layers}
        if lang not in ppl:
            ppl[lang] = perplexity(lm, corpus.sentences(lang), cfg.extract.max_length)
            align.write_json(ppl_path, ppl)
        out[lang] = {"A": a, "ppl": ppl[lang]}
    return out


def perplexity(lm: models.LoadedModel, sentences: list[tuple[str, str]], max_length: int) -> float:
    nll, count = 0.0, 0
    with torch.inference_mode():
        for batch in iter_batches(sentences, lm.tokenizer, PPL_BATCH_TOKENS, max_length):
            ids, mask = batch.input_ids.to(lm.device), batch.attention_mask.to(lm.device)
            logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nll += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                   reduction="sum").item()
            count += int((labels != -100).sum())
    return math.exp(nll / count) if count else math.nan


def compare(before: dict[str, dict], after: dict[str, dict], layers: list[int], targets: list[str]) -> dict:
    languages = {}
    for lang in before:
        a0, a1 = before[lang]["A"], after[lang]["A"]
        gain = {layer: 100.0 * (a1[layer] - a0[layer]) / a0[layer] if a0[layer] else math.nan for layer in layers}
        retention = {layer: 100.0 * a1[layer] / a0[layer] if a0[layer] else math.nan for layer in layers}
        languages[lang] = {
            "role": "target" if lang in targets else "reference" if lang == REFERENCE else "other",
            "A_before": a0, "A_after": a1, "gain_pct": gain, "retention_pct": retention,
            "gain_pct_mean": _mean(gain.values()), "retention_pct_mean": _mean(retention.values()),
            "gain_pct_median": _median(gain.values()), "gain_pct_pooled": _pooled_gain(a0, a1, layers),
            "ppl_before": before[lang]["ppl"], "ppl_after": after[lang]["ppl"],
        }
    english = languages.get(REFERENCE, {})
    return {"targets": targets, "layers": layers, "languages": languages,
            "english_retention_pct": english.get("retention_pct_mean", math.nan)}


def _finite(values) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _mean(values) -> float:
    finite = _finite(values)
    return float(np.mean(finite)) if finite else math.nan


def _median(values) -> float:
    finite = _finite(values)
    return float(np.median(finite)) if finite else math.nan


def _pooled_gain(before: dict, after: dict, layers: list[int]) -> float:
    """Gain of the layer-summed A: robust to layers whose A_before is near zero."""
    total = sum(before[layer] for layer in layers)
    return 100.0 * (sum(after[layer] for layer in layers) - total) / total if total else math.nan


def print_before_after(report: dict, console: Console) -> None:
    table = Table(title=f"Before/after alignment: {report['unit']} ({report['heldout_sentences']} held-out sentences, "
                        f"means over {len(report['layers'])} layers)")
    for col in ("lang", "role", "A before", "A after", "gain %", "retain %", "ppl before", "ppl after"):
        table.add_column(col, justify="left" if col in ("lang", "role") else "right")
    for lang, v in report["languages"].items():
        role = "ref." if v["role"] == "reference" else v["role"]
        table.add_row(lang, role, f"{_mean(v['A_before'].values()):.4g}", f"{_mean(v['A_after'].values()):.4g}",
                      _pct(v["gain_pct_mean"], "+"), _pct(v["retention_pct_mean"]), _num(v["ppl_before"]),
                      _num(v["ppl_after"]), style="bold" if v["role"] == "target" else None)
    table.caption = (f"English retention {_pct(report['english_retention_pct'])} %. gain = 100 (A_after - A_before) / "
                     "A_before and retention = 100 A_after / A_before, per layer, then averaged over layers")
    console.print(table)


def _pct(value, sign: str = "") -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:{sign}.2f}"


def _num(value) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.1f}"
