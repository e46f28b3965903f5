"""Throughput of the benchmark stage: lm-eval requests per second, the shared-context scorer against the old one.

    python -m benchmarks.eval_throughput --model embedded --bench-data ../shared/data/okapi --langs en,hi --limit 24

Side by side on the same items, one row per task x language: the scorer of today
(`toolkit.evaluation.lm.SharedContextLM`, `--eval-scorer lingogap`), the scorer it replaced (lm-eval's HFLM
with the logit window of `legacy_wrapper`, which overrode HFLM's private methods and is kept here only
as the baseline) and, with `--hflm`, lm-eval's plain HFLM (`--eval-scorer hflm`). It prints wall and CPU
seconds, requests/s, the speed-up, the speed-up that arithmetic allows (`bound`, below) and the largest
log-likelihood difference from the baseline (it should be ~1e-5). Run it on purpose; it asserts nothing.

`bound`: multiply-adds of the old scorer over the new one's on these requests, counting T per token
through the blocks (non-embedding parameters) and H per scored position through the output embedding
(vocabulary x width). The old scorer runs every context once per choice; the new one runs each context
once, but still needs a vocabulary-wide row per continuation token to normalise its log-probability.
On Gemma 3 270M H (168M) exceeds T (100M), so multi-token answers (ARC) cap the speed-up near 2x while
one-letter answers (MMLU) allow 4x. Attention and padding are left out of both counts.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import tempfile
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from toolkit import languages, models
from toolkit.config import ModelConfig
from toolkit.evaluation import scoring, tasks


def legacy_wrapper(model, tokenizer, batch_size: int):
    """The scoring this benchmark measures against: HFLM whose model call returns the logits of the last
    K positions only (K covers every row's continuation), or all of them when it cannot match a row."""
    import torch
    from lm_eval.models.huggingface import HFLM

    class WindowHFLM(HFLM):
        _needed: dict[tuple[int, ...], int] = {}

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            self._needed = {}
            for _, context, continuation in requests:
                key = tuple((context + continuation)[-(self.max_length + 1):][:-1])
                self._needed[key] = max(self._needed.get(key, 0), len(continuation))
            try:
                return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)
            finally:
                self._needed = {}

        def _model_call(self, inps, attn_mask=None, labels=None):
            keep = self._window(inps) if self._needed and attn_mask is None and labels is None else None
            if keep is None:
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            with torch.no_grad():
                return self.model(inps, logits_to_keep=keep).logits

        def _window(self, inps) -> int | None:
            width, start = inps.shape[1], inps.shape[1]
            for row in inps.tolist():
                n = len(row)
                while n and row[n - 1] == 0:
                    n -= 1
                length = self._needed.get(tuple(row[:n]))
                if length is None:
                    return None
                start = min(start, n - length)
            return width - max(start, 0)

    assert 0 in tokenizer.all_special_ids and "logits_to_keep" in inspect.signature(model.forward).parameters
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return WindowHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        log.setLevel(level)


def flop_bound(model, pairs: list[tuple[list[int], list[int]]]) -> float:
    """Old scorer's multiply-adds over the new one's on these (context, continuation) token pairs."""
    head = model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - head - model.get_input_embeddings().weight.numel() * (
        model.get_input_embeddings().weight is not model.get_output_embeddings().weight)
    groups: dict[tuple[int, ...], list[int]] = {}
    for ctx, cont in pairs:
        groups.setdefault(tuple(ctx), []).append(len(cont))
    old = sum(len(ctx) * body * len(conts) + sum(conts) * (body + head) for ctx, conts in groups.items())
    new = sum(len(ctx) * body + head + sum(conts) * (body + head) - len(conts) * (body + head)
              for ctx, conts in groups.items())
    return old / new


def recording(wrapper) -> list:
    """The token pairs the shared-context scorer is asked for, as it scores them."""
    pairs: list = []
    score = wrapper.score_tokens

    def record(batch):
        pairs.extend(batch)
        return score(batch)

    wrapper.score_tokens = record
    return pairs


def timed(wrapper, bt: tasks.BenchTask) -> tuple[float, float, np.ndarray]:
    wall, cpu = time.perf_counter(), time.process_time()
    scores = scoring.evaluate(wrapper, bt)
    lls = np.concatenate([v["lls"] for v in scores.items.values()])
    return time.perf_counter() - wall, time.process_time() - cpu, lls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--bench-data", default="../shared/data/okapi")
    parser.add_argument("--tasks", default="arc,mmlu")
    parser.add_argument("--langs", default="en,hi")
    parser.add_argument("--limit", type=int, default=24)
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hflm", action="store_true", help="also time lm-eval's plain HFLM (slow on MMLU)")
    args = parser.parse_args()

    console = Console()
    lm = models.load(ModelConfig(name=args.model))
    with tempfile.TemporaryDirectory() as tmp:
        bench_tasks = tasks.load(tasks.plan(tasks.parse_tasks(args.tasks), languages.resolve(args.langs),
                                            args.bench_data), args.bench_data, tmp, shots=args.shots, limit=args.limit)
    wrappers = {"old": legacy_wrapper(lm.model, lm.tokenizer, args.batch_size),
                "new": scoring.lm_wrapper(lm.model, lm.tokenizer, args.batch_size, "lingogap")}
    if args.hflm:
        wrappers["hflm"] = scoring.lm_wrapper(lm.model, lm.tokenizer, args.batch_size, "hflm")
    table = Table(title=f"lm-eval throughput · {lm.model_id} · {lm.device} · batch {args.batch_size} · "
                        f"{args.shots}-shot")
    columns = ["task", "lang", "requests", *(f"{k} s (cpu)" for k in wrappers), "req/s old", "req/s new",
               "speed-up", "bound", "max |Δ ll|"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("task", "lang") else "right")
    totals = {k: 0.0 for k in wrappers}
    for bt in (t for t in bench_tasks if t.ok):
        pairs = recording(wrappers["new"])
        runs = {name: timed(w, bt) for name, w in wrappers.items()}
        del wrappers["new"].score_tokens
        for name, (wall, _, _) in runs.items():
            totals[name] += wall
        diff = max(np.abs(runs[k][2] - runs["old"][2]).max() for k in runs)
        table.add_row(bt.bench, bt.lang, str(bt.n_requests), *(f"{w:.1f} ({c:.1f})" for w, c, _ in runs.values()),
                      f"{bt.n_requests / runs['old'][0]:.1f}", f"{bt.n_requests / runs['new'][0]:.1f}",
                      f"{runs['old'][0] / runs['new'][0]:.2f}x", f"{flop_bound(lm.model, pairs):.2f}x", f"{diff:.1e}")
    console.print(table)
    console.print("total wall s: " + ", ".join(f"{k} {v:.1f}" for k, v in totals.items()))


if __name__ == "__main__":
    main()
