"""Evaluation job: ARC-Challenge, MMLU and HellaSwag per language, base and every adapter on the same items.

Models: the base model, and base + each peft adapter: `--adapter DIR`, or the run's adapters by the one rule
of `RunDir.adapters` (every `RUN/align/{lang}/adapter` and `RUN/align/joint/adapter`; with `--sweep-points`
also every sweep point's `RUN/align/{lang}@{tag}/adapter`). Every adapter is checked against the base
model's modules and shapes before anything is scored. The base is loaded once; each adapter goes onto a
deep copy of it (merged in float32, unmerged otherwise: `toolkit.models.apply_adapter`) and is dropped
after its evaluation, so memory holds at most two copies of the weights. Beside the benchmarks, each
model scores bits per byte on the corpus's held-out sentences (`toolkit.evaluation.bpb`).

Writes RUN/eval/: results.json (everything; keys in docs/evaluation.md), results.csv (model x task x
language, with the paired comparison on adapted rows), items.csv (per-item scores, the input of the
paired tests), bpb.csv (per-sentence bits per byte), figures/accuracy.png, figures/p_gold.png,
figures/gap_vs_performance.png (when RUN/reports/gaps.csv exists), and tasks/ (the lm-eval YAMLs of
offline tasks, as run).
"""

from __future__ import annotations

import copy
import gc
import os
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from toolkit import models
from toolkit.config import Config
from toolkit.errors import UserError
from toolkit.evaluation import bpb, correlate, metrics, outputs, scoring, tasks
from toolkit.rundir import ADAPTER_CONFIG, RunDir
from toolkit.stages import Task


def adapter_label(path: str | Path) -> str:
    """`adapted:` and the unit an adapter was trained for (its folder's name: a language, joint, a sweep point)."""
    path = Path(path)
    return f"adapted:{path.parent.name if path.name == 'adapter' and path.parent.name else path.name}"


def discover_adapters(cfg: Config) -> list[tuple[str, Path]]:
    """`model.adapter` when set, else the run's adapters (`RunDir.adapters`; sweep points with eval.sweep_points)."""
    if cfg.model.adapter:
        path = Path(cfg.model.adapter)
        if not (path / ADAPTER_CONFIG).is_file():
            raise UserError(f"--adapter {path}: no {ADAPTER_CONFIG} there (expected a peft adapter directory)")
        return [(adapter_label(path), path)]
    return [(f"adapted:{name}", p) for name, p in RunDir(cfg.run_dir).adapters(points=cfg.eval.sweep_points).items()]


def run(cfg: Config, task: Task | None = None) -> dict:
    """Evaluate base and adapted models on the configured benchmarks and languages; returns results.json.

    Evaluation is one task (the whole stage), so `task` only completes the job signature."""
    console = Console(stderr=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.time()
    run_dir = RunDir(cfg.run_dir)
    benches = tasks.parse_tasks(cfg.eval.tasks)
    adapters = discover_adapters(cfg)
    labels = ([] if cfg.eval.no_base and adapters else ["base"]) + [label for label, _ in adapters]

    with console.status("building lm-eval tasks"):
        bench_tasks = tasks.plan(benches, cfg.lang_codes, cfg.eval.bench_data)
        tasks.load(bench_tasks, cfg.eval.bench_data, run_dir.eval_tasks, cfg.eval.shots, cfg.eval.limit, cfg.run.seed)
    present = [bt for bt in bench_tasks if bt.ok]
    show_plan(cfg, bench_tasks, labels, console)
    if not present:
        raise UserError("no benchmark data for any selected language: check --tasks, --langs and --bench-data")

    heldout = load_heldout(cfg, console)
    with console.status(f"loading {cfg.model.name}"):
        base = models.load(replace(cfg.model, adapter=""))
    for _, path in adapters:
        check_adapter(base.model, path)
    run_dir.write_manifest(cfg, "evaluate")  # what runs, once every input has been checked
    scores, bits, seconds = score_models(cfg, base, adapters, labels, present, heldout, console)
    result = results_json(cfg, benches, base.model_id, adapters, labels, scores, bench_tasks, seconds, bits)
    result["wall_seconds"] = round(time.time() - started, 1)
    outputs.write_outputs(result, scores, run_dir, bits)
    for table in outputs.tables(result):
        console.print(table)
    if not result["gaps"]:
        gaps_csv = run_dir.gaps_csv
        console.print(f"[dim]no {gaps_csv}: run the report stage to correlate accuracy with the activation gaps[/]")
    console.print(f"wrote {run_dir.eval_results}, results.csv, items.csv, figures/accuracy.png "
                  f"in {result['wall_seconds']:.0f} s")
    return result


Heldout = tuple[list[str], dict[str, list[str]]]  # held-out ids, language -> sentences


def load_heldout(cfg: Config, console: Console) -> Heldout:
    """The sentences that bits per byte scores: those alignment holds out (none with eval.bpb_sentences 0).

    A corpus that cannot give them (too small to split, absent here) skips bits per byte, not the stage."""
    if not cfg.eval.bpb_sentences:
        return [], {}
    try:
        ids, texts = bpb.heldout_texts(cfg.run.corpus, cfg.lang_codes, cfg.eval.bpb_sentences, cfg.align.heldout,
                                       cfg.align.val_fraction, cfg.run.seed, cfg.run.max_sentences)
    except UserError as exc:
        console.print(f"[yellow]bits per byte skipped:[/] {exc}")
        return [], {}
    if not ids:
        console.print(f"[yellow]bits per byte skipped:[/] alignment holds out no sentence of {cfg.run.corpus} "
                      f"(align.heldout {cfg.align.heldout})")
        return [], {}
    return ids, texts


def check_adapter(model, path: Path) -> None:
    """Refuse an adapter whose LoRA weights name modules the model lacks or have shapes it cannot take."""
    import torch
    from safetensors.torch import load_file

    files = [path / "adapter_model.safetensors", path / "adapter_model.bin"]
    weights_file = next((f for f in files if f.is_file()), None)
    if weights_file is None:
        raise UserError(f"adapter {path}: no adapter_model.safetensors (or .bin) there")
    weights = (load_file(str(weights_file)) if weights_file.suffix == ".safetensors"
               else torch.load(weights_file, map_location="cpu", weights_only=True))
    modules = dict(model.named_modules())
    for key, tensor in weights.items():
        if ".lora_A" not in key and ".lora_B" not in key:
            continue
        name = key.split(".lora_")[0].removeprefix("base_model.model.")
        module = modules.get(name)
        if module is None or not hasattr(module, "in_features"):
            raise UserError(f"adapter {path} does not fit this model: it adapts {name}, which the model does not have "
                            "as a linear layer (an adapter trained on another model?)")
        want = module.in_features if ".lora_A" in key else module.out_features
        have = tensor.shape[1] if ".lora_A" in key else tensor.shape[0]
        if have != want:
            raise UserError(f"adapter {path} does not fit this model: {key} has {have} features where {name} has "
                            f"{want} (an adapter trained on another model?)")


def score_models(cfg: Config, base: models.LoadedModel, adapters: list[tuple[str, Path]], labels: list[str],
                 present: list[tasks.BenchTask], heldout: Heldout, console: Console) -> tuple[dict, dict, dict]:
    """Per-item scores and bits per byte of every model, and each model's seconds, with a progress bar."""
    scores: dict[str, dict[tuple[str, str], scoring.Scores]] = {}
    bits: dict[str, dict[str, dict]] = {}
    seconds: dict[str, float] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    ids, texts = heldout
    total = (sum(bt.n_requests for bt in present) + len(ids) * len(texts)) * len(labels)
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("evaluate", total=total)
        for label in labels:
            t0 = time.time()
            path = dict(adapters).get(label)
            model = base.model if path is None else models.apply_adapter(copy.deepcopy(base.model), path).eval()
            lm = scoring.lm_wrapper(model, base.tokenizer, cfg.eval.batch_size, cfg.eval.scorer)
            scores[label] = {}
            for bt in present:
                progress.update(bar, description=f"{label} · {bt.bench} {bt.lang} ({bt.n_items} items)")
                t_task = time.time()
                s = scores[label][(bt.bench, bt.lang)] = scoring.evaluate(lm, bt, cfg.run.seed)
                progress.advance(bar, bt.n_requests)
                acc, se = metrics.mean_se(s.values("acc"))
                p, p_se = metrics.mean_se(s.values("p_gold"))
                # one line per task, so that logs of non-interactive runs (Slurm, nohup) show progress too
                progress.console.print(f"{label} · {bt.bench} {bt.lang}: {s.n} items, acc {outputs.fmt(acc)} ± "
                                       f"{outputs.fmt(se)}, p_gold {outputs.fmt(p)} ± {outputs.fmt(p_se)} "
                                       f"({time.time() - t_task:.0f} s)", highlight=False)
            bits[label] = {}
            for lang, sentences in texts.items():
                progress.update(bar, description=f"{label} · bits per byte {lang} ({len(sentences)} sentences)")
                bits[label][lang] = bpb.score(lm, ids, sentences)
                progress.advance(bar, len(sentences))
            seconds[label] = round(time.time() - t0, 1)
            del lm
            if path is not None:
                del model
                gc.collect()
    return scores, bits, seconds


def bpb_rows(bits: dict[str, dict[str, dict]], seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Bits per byte per model and language, and each adapted model's paired difference from base."""
    rows = [{"model": model, "language": lang, **{k: v for k, v in b.items() if k != "sentences"}}
            for model, per_lang in bits.items() for lang, b in per_lang.items()]
    pairs = [bpb.compare(model, lang, bits["base"][lang], b, seed)
             for model, per_lang in bits.items() if model != "base" and "base" in bits
             for lang, b in per_lang.items() if lang in bits["base"]]
    return rows, [c for c in pairs if c is not None]


def results_json(cfg: Config, benches: list[str], model_id: str, adapters: list[tuple[str, Path]], labels: list[str],
                 scores: dict, bench_tasks: list[tasks.BenchTask], seconds: dict[str, float],
                 bits: dict[str, dict[str, dict]] | None = None) -> dict:
    """results.json: the config, the models, results, paired comparisons, bits per byte, gap correlations."""
    results, comparisons = scoring.summarise(scores, bench_tasks, cfg.run.seed)
    bpb_results, bpb_comparisons = bpb_rows(bits or {}, cfg.run.seed)
    gaps_csv = RunDir(cfg.run_dir).gaps_csv
    gaps = correlate.band_gaps(gaps_csv, cfg.report.stat) if gaps_csv.is_file() else {}
    return {
        "format": "lingogap-eval",
        "version": 2,
        "config": {"tasks": benches, "languages": cfg.lang_codes, "limit": cfg.eval.limit, "shots": cfg.eval.shots,
                   "seed": cfg.run.seed, "batch_size": cfg.eval.batch_size, "scorer": cfg.eval.scorer,
                   "source": "okapi-json" if cfg.eval.bench_data else "hub",
                   "bench_data": str(Path(cfg.eval.bench_data).resolve()) if cfg.eval.bench_data else None,
                   "selection": "lowest sha256(f'{seed}:{item_id}') per task and language" if cfg.eval.limit
                   else "all items",
                   "splits": {b: {"test": tasks.BENCHMARKS[b].test_split,
                                  "fewshot": list(tasks.BENCHMARKS[b].fewshot_splits)} for b in benches},
                   "primary": {b: tasks.BENCHMARKS[b].primary for b in benches},
                   "bpb": {"corpus": cfg.run.corpus, "heldout_fraction": cfg.align.heldout,
                           "sentences": cfg.eval.bpb_sentences}},
        "models": [{"label": label, "model_id": model_id, "adapter": str(dict(adapters).get(label) or "") or None,
                    "seconds": seconds.get(label)} for label in labels],
        "results": results,
        "comparisons": comparisons,
        "bpb": bpb_results,
        "bpb_comparisons": bpb_comparisons,
        "gaps": {"source": str(gaps_csv), "statistic": cfg.report.stat, "bands": gaps} if gaps else None,
        "correlations": correlate.gap_correlations(results, comparisons, gaps, bpb_results, cfg.run.seed)
        if gaps else [],
        "wall_seconds": None,
    }


def show_plan(cfg: Config, bench_tasks: list[tasks.BenchTask], labels: list[str], console: Console) -> None:
    """Derived facts before the long part: what runs, how many items and loglikelihood requests."""
    present = [bt for bt in bench_tasks if bt.ok]
    items, requests = sum(bt.n_items for bt in present), sum(bt.n_requests for bt in present)
    console.print(
        f"[bold]evaluate[/] {len(present)} task x language units ({len(bench_tasks) - len(present)} missing), "
        f"{items:,} items, {requests:,} loglikelihood requests per model x {len(labels)} model(s) "
        f"({', '.join(labels)}); {cfg.eval.shots}-shot, batch {cfg.eval.batch_size}, seed {cfg.run.seed}, "
        f"tasks from {cfg.eval.bench_data or 'the hub'}"
    )
    for bt in bench_tasks:
        if not bt.ok:
            console.print(f"  [yellow]missing[/] {bt.bench} {bt.lang}: {bt.missing}")

