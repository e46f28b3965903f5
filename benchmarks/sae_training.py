"""Local SAE training recipes compared on the embedded model: held-out FVE and L0 per layer and language, wall time.

    python -m benchmarks.sae_training --layers 3,9,15 --arch relu,jumprelu,batchtopk [--mix corpus] [--budget quick]

Each recipe trains into a fresh folder (nothing cached); prints one table and writes a JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from toolkit import corpus as corpora
from toolkit import models, sae_set, sae_training
from toolkit.config import Config, parse_layers
from toolkit.corpus import is_heldout
from toolkit.rundir import RunDir


def measure(arch: str, mix: str, budget: str, layers: str, langs: str, corpus: str, max_sentences: int,
            extra: dict, console: Console, workdir: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(dir=workdir) as run:
        cfg = Config.build({"run": {"run": run, "langs": langs, "layers": layers, "corpus": corpus,
                                    "max_sentences": max_sentences},
                            "sae": {"source": "train", "arch": arch, "train_mix": mix, "budget": budget, **extra}})
        lm = models.load(cfg.model)
        data = corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)
        chosen = parse_layers(cfg.run.layers, lm.n_layers)
        start = time.perf_counter()
        trained = sae_training.train(cfg.sae_setup, lm, chosen, data, RunDir(run).saes, console)
        seconds = time.perf_counter() - start
        heldout = data.subset([sid for sid in data.ids if is_heldout(sid)])
        per_lang = {}
        for lang in heldout.langs:
            sae_set.measure_quality(trained, lm, heldout.sentences(lang), cfg.extract.batch_tokens,
                                 cfg.extract.max_length)
            per_lang[lang] = trained.quality()
    return {"arch": arch, "mix": mix, "budget": budget, "seconds": seconds, "per_language": per_lang}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="3,9,15")
    parser.add_argument("--arch", default="relu,jumprelu,batchtopk")
    parser.add_argument("--mix", default="corpus")
    parser.add_argument("--budget", default="quick")
    parser.add_argument("--langs", default="all")
    parser.add_argument("--corpus", default="embedded")
    parser.add_argument("--max-sentences", type=int, default=0)
    parser.add_argument("--set", default="{}", help="more sae.* fields as JSON, e.g. '{\"target_l0\": 48}'")
    parser.add_argument("--out", default="sae_training.json")
    parser.add_argument("--workdir", default=None, help="where the throw-away runs go (default: the system's temp)")
    args = parser.parse_args()
    console = Console(stderr=True)
    results = [measure(arch, mix, args.budget, args.layers, args.langs, args.corpus, args.max_sentences,
                       json.loads(args.set), console, args.workdir)
               for arch in args.arch.split(",") for mix in args.mix.split(",")]
    Path(args.out).write_text(json.dumps(results, indent=1))
    show(results)


def show(results: list[dict]) -> None:
    table = Table(title="held-out FVE / L0 per layer and language")
    table.add_column("recipe")
    table.add_column("seconds", justify="right")
    table.add_column("layer", justify="right")
    langs = list(results[0]["per_language"])
    for lang in langs:
        table.add_column(lang, justify="right")
    for r in results:
        first = r["per_language"][langs[0]]
        for layer in first:
            cells = [f"{r['per_language'][lang][layer]['fve']:.2f}/{r['per_language'][lang][layer]['l0']:.0f}"
                     for lang in langs]
            table.add_row(f"{r['arch']} {r['mix']} {r['budget']}", f"{r['seconds']:.0f}", layer, *cells)
    Console().print(table)


if __name__ == "__main__":
    main()
