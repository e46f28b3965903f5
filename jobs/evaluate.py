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
import csv
import gc
import json
import os
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from toolkit import bench, models
from toolkit.config import Config
from toolkit.errors import UserError
from toolkit.languages import LANGUAGES
from toolkit.rundir import RunDir


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


def run(cfg: Config, console: Console | None = None) -> dict:
    """Evaluate base and adapted models on the configured benchmarks and languages; returns results.json."""
    console = console or Console(stderr=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.time()
    run_dir = RunDir(cfg.run_dir)
    run_dir.write_manifest(cfg, "evaluate")
    out_dir = run_dir.eval
    benches = bench.parse_tasks(cfg.eval.tasks)
    adapters = discover_adapters(cfg)
    labels = ([] if cfg.eval.no_base and adapters else ["base"]) + [label for label, _ in adapters]

    with console.status("building lm-eval tasks"):
        units = bench.plan_units(benches, cfg.lang_codes, cfg.eval.bench_data)
        bench.load_units(units, cfg.eval.bench_data, out_dir / "tasks", cfg.eval.shots, cfg.eval.limit, cfg.run.seed)
    present = [u for u in units if u.ok]
    show_plan(cfg, units, labels, console)
    if not present:
        raise UserError("no benchmark data for any selected language: check --tasks, --langs and --bench-data")

    with console.status(f"loading {cfg.model.name}"):
        base = models.load(replace(cfg.model, adapter=""))
    scores: dict[str, dict[tuple[str, str], bench.Scores]] = {}
    seconds: dict[str, float] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    total = sum(u.n_requests for u in present) * len(labels)
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("evaluate", total=total)
        for label in labels:
            t0 = time.time()
            path = dict(adapters).get(label)
            model = base.model if path is None else models.apply_adapter(copy.deepcopy(base.model), path).eval()
            lm = bench.lm_wrapper(model, base.tokenizer, cfg.eval.batch_size)
            scores[label] = {}
            for unit in present:
                progress.update(bar, description=f"{label} · {unit.bench} {unit.lang} ({unit.n_items} items)")
                t_unit = time.time()
                s = scores[label][(unit.bench, unit.lang)] = bench.evaluate_unit(lm, unit, cfg.run.seed)
                progress.advance(bar, unit.n_requests)
                acc, se = bench.accuracy(s.values("acc"))
                # one line per unit, so that logs of non-interactive runs (Slurm, nohup) show progress too
                progress.console.print(f"{label} · {unit.bench} {unit.lang}: {s.n} items, acc {bench.fmt(acc)} ± "
                                       f"{bench.fmt(se)} ({time.time() - t_unit:.0f} s)", highlight=False)
            seconds[label] = round(time.time() - t0, 1)
            del lm
            if path is not None:
                del model
                gc.collect()

    results, comparisons = bench.summarise(scores, units)
    gaps_csv = run_dir.reports / "gaps.csv"
    gaps = bench.mean_gaps(gaps_csv, cfg.report.stat) if gaps_csv.is_file() else {}
    result = {
        "format": "lingogap-eval",
        "version": 1,
        "config": {"tasks": benches, "languages": cfg.lang_codes, "limit": cfg.eval.limit, "shots": cfg.eval.shots,
                   "seed": cfg.run.seed, "batch_size": cfg.eval.batch_size,
                   "source": "okapi-json" if cfg.eval.bench_data else "hub",
                   "bench_data": str(Path(cfg.eval.bench_data).resolve()) if cfg.eval.bench_data else None,
                   "selection": "lowest sha256(f'{seed}:{item_id}') per task and language" if cfg.eval.limit
                   else "all items",
                   "splits": {b: {"test": bench.BENCHMARKS[b].test_split,
                                  "fewshot": list(bench.BENCHMARKS[b].fewshot_splits)} for b in benches}},
        "models": [{"label": label, "model_id": base.model_id, "adapter": str(dict(adapters).get(label) or "") or None,
                    "seconds": seconds.get(label)} for label in labels],
        "results": results,
        "comparisons": comparisons,
        "gaps": {"source": str(gaps_csv), "statistic": cfg.report.stat, "mean_gap_pct": gaps} if gaps else None,
        "correlations": bench.gap_correlations(results, comparisons, gaps, cfg.run.seed) if gaps else [],
        "wall_seconds": round(time.time() - started, 1),
    }
    write_outputs(result, scores, out_dir)
    for table in bench.tables(result):
        console.print(table)
    if not gaps:
        console.print(f"[dim]no {gaps_csv}: run the report stage to correlate accuracy with the activation gaps[/]")
    console.print(f"wrote {out_dir / 'results.json'}, results.csv, items.csv, figures/accuracy.png "
                  f"in {result['wall_seconds']:.0f} s")
    return result


def show_plan(cfg: Config, units: list[bench.Unit], labels: list[str], console: Console) -> None:
    """Derived facts before the long part: what runs, how many items and loglikelihood requests."""
    present = [u for u in units if u.ok]
    items, requests = sum(u.n_items for u in present), sum(u.n_requests for u in present)
    console.print(
        f"[bold]evaluate[/] {len(present)} task x language units ({len(units) - len(present)} missing), "
        f"{items:,} items, {requests:,} loglikelihood requests per model x {len(labels)} model(s) "
        f"({', '.join(labels)}); {cfg.eval.shots}-shot, batch {cfg.eval.batch_size}, seed {cfg.run.seed}, "
        f"tasks from {cfg.eval.bench_data or 'the hub'}"
    )
    for unit in units:
        if not unit.ok:
            console.print(f"  [yellow]missing[/] {unit.bench} {unit.lang}: {unit.missing}")


def write_outputs(result: dict, scores: dict[str, dict[tuple[str, str], bench.Scores]], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    os.replace(tmp, out_dir / "results.json")
    bench.write_csv(result["results"], result["comparisons"], out_dir / "results.csv")
    with open(out_dir / "items.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model", "task", "language", "item", *bench.PAIRED_METRICS, "pred", "gold"])
        for label, per_unit in scores.items():
            for (task, lang), s in per_unit.items():
                for key, values in s.items.items():
                    writer.writerow([label, task, lang, key, *(int(values[m]) for m in bench.PAIRED_METRICS),
                                     values["pred"], values["gold"]])
    bench.figure(result["results"], out_dir / "figures" / "accuracy.png")
