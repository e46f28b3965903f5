"""Extraction throughput and memory: forward only, + capture, + SAE encoding, + HDF5 write.

Run on purpose, never in the test suite:
    OMP_NUM_THREADS=2 python benchmarks/bench_extract.py --preset embedded --corpus ntrex:../shared/data/ntrex128 \
        --max-sentences 100 --lang hi
Prints one table: real tokens/s, padded/real tokens, peak RSS, for each level of the pipeline, and the
padding cost of a fixed 128-token batch for comparison.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

from jobs.extract import Unit, encode_batch, extract_unit
from toolkit import corpus as corpora
from toolkit import models, saes
from toolkit.capture import ResidualCapture, TokenBatch, iter_batches
from toolkit.config import Config, parse_layers


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fixed_length(batches: list[TokenBatch], width: int, pad: int) -> list[TokenBatch]:
    out = []
    for b in batches:
        ids = torch.full((len(b.sentence_ids), width), pad)
        mask = torch.zeros_like(ids)
        ids[:, : b.input_ids.shape[1]] = b.input_ids
        mask[:, : b.input_ids.shape[1]] = b.attention_mask
        out.append(TokenBatch(b.sentence_ids, ids, mask))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="embedded")
    p.add_argument("--corpus", default="embedded")
    p.add_argument("--max-sentences", type=int, default=100)
    p.add_argument("--lang", default="hi")
    p.add_argument("--sae", default="random", help="SAE source; random is enough for throughput")
    p.add_argument("--sae-width", type=int, default=16384, help="Gemma Scope's width by default")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as run:
        cfg = Config.build({"run": {"run": run, "langs": args.lang, "corpus": args.corpus,
                                    "max_sentences": args.max_sentences},
                            "sae": {"source": args.sae, "width": args.sae_width}}, preset=args.preset)
        corpus = corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)
        lm = models.load(cfg.model)
        layers = parse_layers(cfg.run.layers, lm.n_layers)
        sae_set = saes.load(cfg, lm, layers, corpus)
        sentences = corpus.sentences(args.lang)
        batches = list(iter_batches(sentences, lm.tokenizer, cfg.extract.batch_tokens, cfg.extract.max_length))
        real = sum(b.n_real for b in batches)
        base = lm.model.get_decoder()

        def forward(bs):
            with torch.inference_mode():
                for b in bs:
                    base(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

        def capture(bs):
            with torch.inference_mode(), ResidualCapture(lm, layers, lambda i, h: h.cpu()) as cap:
                for b in bs:
                    cap.run(b)

        def encode(bs):
            for b in bs:
                encode_batch(lm, sae_set, b, layers, save_resid=False)

        def write(bs):
            extract_unit(cfg, lm, sae_set, corpus, Unit(args.lang), layers, Console(quiet=True))

        padded = fixed_length(batches, cfg.extract.max_length, lm.tokenizer.pad_token_id)
        rows = [("forward, fixed 128-token padding", forward, padded),
                ("forward, length-grouped batches", forward, batches),
                ("+ capture all layers (hooks)", capture, batches),
                ("+ SAE encode, CSR, stats", encode, batches),
                ("+ HDF5 parts and consolidation", write, batches)]
        width = sae_set.layers[layers[0]].d_sae
        table = Table(title=f"extraction, {lm.model_id}, {len(layers)} layers, {args.lang}, {len(sentences)} "
                            f"sentences, SAE width {width}, {torch.get_num_threads()} threads")
        for col in ("stage", "real tokens/s", "padded/real", "seconds", "peak RSS MB"):
            table.add_column(col, justify="left" if col == "stage" else "right")
        for name, fn, bs in rows:
            start = time.perf_counter()
            fn(bs)
            seconds = time.perf_counter() - start
            ratio = sum(b.n_padded for b in bs) / real
            table.add_row(name, f"{real / seconds:,.0f}", f"{ratio:.2f}", f"{seconds:.1f}", f"{peak_rss_mb():,.0f}")
        Console().print(table)


if __name__ == "__main__":
    main()
