"""Evaluation job: ARC-Challenge, MMLU and HellaSwag per language, base and every adapter on the same items.

Models: the base model, and base + each peft adapter: `--adapter DIR`, or every `RUN/align/{lang}/adapter`
(a folder with adapter_config.json). The base is loaded once; each adapter is merged into a deep copy of
it and dropped after its evaluation, so memory holds at most two copies of the weights.

Writes RUN/eval/: results.json (everything), results.csv (model x task x language, with the paired
comparison on adapted rows), items.csv (per-item correctness, the input of the paired tests),
figures/accuracy.png, and tasks/ (the lm-eval YAMLs of offline tasks, as run).
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
from toolkit.evaluation import outputs, scoring, tasks
from toolkit.languages import LANGUAGES
from toolkit.rundir import RunDir
from toolkit.stages import Task


def adapter_label(path: str | Path) -> str:
    path = Path(path)
    name = path.parent.name if path.name == "adapter" and path.parent.name in LANGUAGES else path.name
    return f"adapted:{name}"


def discover_adapters(cfg: Config) -> list[tuple[str, Path]]:
    """`model.adapter` when set, else every RUN/align/{lang}/adapter that holds a peft adapter."""
    if cfg.model.adapter:
        path = Path(cfg.model.adapter)
        if not (path / "adapter_config.json").is_file():
            raise UserError(f"--adapter {path}: no adapter_config.json there (expected a peft adapter directory)")
        return [(adapter_label(path), path)]
    found = [RunDir(cfg.run_dir).align(lang) / "adapter" for lang in LANGUAGES]
    return [(adapter_label(p), p) for p in found if (p / "adapter_config.json").is_file()]


def run(cfg: Config, task: Task | None = None) -> dict:
    """Evaluate base and adapted models on the configured benchmarks and languages; returns results.json.

    Evaluation is one task (the whole stage), so `task` only completes the job signature."""
    console = Console(stderr=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.time()
    run_dir = RunDir(cfg.run_dir)
    run_dir.write_manifest(cfg, "evaluate")
    out_dir = run_dir.eval
    benches = tasks.parse_tasks(cfg.eval.tasks)
    adapters = discover_adapters(cfg)
    labels = ([] if cfg.eval.no_base and adapters else ["base"]) + [label for label, _ in adapters]

    with console.status("building lm-eval tasks"):
        bench_tasks = tasks.plan(benches, cfg.lang_codes, cfg.eval.bench_data)
        tasks.load(bench_tasks, cfg.eval.bench_data, out_dir / "tasks", cfg.eval.shots, cfg.eval.limit, cfg.run.seed)
    present = [bt for bt in bench_tasks if bt.ok]
    show_plan(cfg, bench_tasks, labels, console)
    if not present:
        raise UserError("no benchmark data for any selected language: check --tasks, --langs and --bench-data")

    with console.status(f"loading {cfg.model.name}"):
        base = models.load(replace(cfg.model, adapter=""))
    scores, seconds = score_models(cfg, base, adapters, labels, present, console)
    result = results_json(cfg, benches, base.model_id, adapters, labels, scores, bench_tasks, seconds)
    result["wall_seconds"] = round(time.time() - started, 1)
    outputs.write_outputs(result, scores, out_dir)
    for table in outputs.tables(result):
        console.print(table)
    if not result["gaps"]:
        gaps_csv = run_dir.reports / "gaps.csv"
        console.print(f"[dim]no {gaps_csv}: run the report stage to correlate accuracy with the activation gaps[/]")
    console.print(f"wrote {out_dir / 'results.json'}, results.csv, items.csv, figures/accuracy.png "
                  f"in {result['wall_seconds']:.0f} s")
    return result


def score_models(cfg: Config, base: models.LoadedModel, adapters: list[tuple[str, Path]], labels: list[str],
                 present: list[tasks.BenchTask], console: Console) -> tuple[dict, dict[str, float]]:
    """Per-item scores of every model on every present task, and each model's seconds, with a progress bar."""
    scores: dict[str, dict[tuple[str, str], scoring.Scores]] = {}
    seconds: dict[str, float] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    total = sum(bt.n_requests for bt in present) * len(labels)
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
                acc, se = scoring.accuracy(s.values("acc"))
                # one line per task, so that logs of non-interactive runs (Slurm, nohup) show progress too
                progress.console.print(f"{label} · {bt.bench} {bt.lang}: {s.n} items, acc {outputs.fmt(acc)} ± "
                                       f"{outputs.fmt(se)} ({time.time() - t_task:.0f} s)", highlight=False)
            seconds[label] = round(time.time() - t0, 1)
            del lm
            if path is not None:
                del model
                gc.collect()
    return scores, seconds


def results_json(cfg: Config, benches: list[str], model_id: str, adapters: list[tuple[str, Path]], labels: list[str],
                 scores: dict, bench_tasks: list[tasks.BenchTask], seconds: dict[str, float]) -> dict:
    """results.json: the config, the models, results, paired comparisons and the gap correlations."""
    results, comparisons = scoring.summarise(scores, bench_tasks)
    gaps_csv = RunDir(cfg.run_dir).reports / "gaps.csv"
    gaps = scoring.mean_gaps(gaps_csv, cfg.report.stat) if gaps_csv.is_file() else {}
    return {
        "format": "lingogap-eval",
        "version": 1,
        "config": {"tasks": benches, "languages": cfg.lang_codes, "limit": cfg.eval.limit, "shots": cfg.eval.shots,
                   "seed": cfg.run.seed, "batch_size": cfg.eval.batch_size, "scorer": cfg.eval.scorer,
                   "source": "okapi-json" if cfg.eval.bench_data else "hub",
                   "bench_data": str(Path(cfg.eval.bench_data).resolve()) if cfg.eval.bench_data else None,
                   "selection": "lowest sha256(f'{seed}:{item_id}') per task and language" if cfg.eval.limit
                   else "all items",
                   "splits": {b: {"test": tasks.BENCHMARKS[b].test_split,
                                  "fewshot": list(tasks.BENCHMARKS[b].fewshot_splits)} for b in benches}},
        "models": [{"label": label, "model_id": model_id, "adapter": str(dict(adapters).get(label) or "") or None,
                    "seconds": seconds.get(label)} for label in labels],
        "results": results,
        "comparisons": comparisons,
        "gaps": {"source": str(gaps_csv), "statistic": cfg.report.stat, "mean_gap_pct": gaps} if gaps else None,
        "correlations": scoring.gap_correlations(results, comparisons, gaps, cfg.run.seed) if gaps else [],
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

