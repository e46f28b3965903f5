"""Throughput of the benchmark stage: lm-eval requests per second with the logit window and without.

    python -m benchmarks.eval_throughput --model embedded --bench-data ../shared/data/okapi --langs en,hi --limit 20

Prints one row per task x language: loglikelihood requests, CPU and wall seconds with the window
(`toolkit.scoring.lm_wrapper(fast=True)`, the default) and with lm-eval's full logits, the speed-up, and
the largest difference of a log-likelihood between the two (it should be ~0). Run it on purpose; it
asserts nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from toolkit import languages, models
from toolkit.config import ModelConfig
from toolkit.evaluation import scoring, tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--bench-data", default="../shared/data/okapi")
    parser.add_argument("--tasks", default="arc,mmlu")
    parser.add_argument("--langs", default="en,hi")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    console = Console()
    lm = models.load(ModelConfig(name=args.model))
    with tempfile.TemporaryDirectory() as tmp:
        bench_tasks = tasks.load(tasks.plan(tasks.parse_tasks(args.tasks), languages.resolve(args.langs),
                                            args.bench_data), args.bench_data, tmp, limit=args.limit)
    table = Table(title=f"lm-eval throughput · {lm.model_id} · {lm.device} · batch {args.batch_size}")
    for col in ("task", "lang", "requests", "window s (cpu)", "full s (cpu)", "req/s window", "speed-up", "max |Δ ll|"):
        table.add_column(col, justify="left" if col in ("task", "lang") else "right")
    wrappers = {fast: scoring.lm_wrapper(lm.model, lm.tokenizer, args.batch_size, fast=fast) for fast in (True, False)}
    for bt in (t for t in bench_tasks if t.ok):
        timing, lls = {}, {}
        for fast, wrapper in wrappers.items():
            wall, cpu = time.perf_counter(), time.process_time()
            scores = scoring.evaluate(wrapper, bt)
            timing[fast] = (time.perf_counter() - wall, time.process_time() - cpu)
            lls[fast] = np.concatenate([v["lls"] for v in scores.items.values()])
        seconds = [f"{timing[fast][0]:.1f} ({timing[fast][1]:.1f})" for fast in (True, False)]
        table.add_row(bt.bench, bt.lang, str(bt.n_requests), *seconds,
                      f"{bt.n_requests / timing[True][0]:.1f}", f"{timing[False][1] / timing[True][1]:.2f}x",
                      f"{np.abs(lls[True] - lls[False]).max():.1e}")
    console.print(table)


if __name__ == "__main__":
    main()
