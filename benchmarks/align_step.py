"""Alignment step cost (issue 8): one training step with the alignment loss vs a plain LoRA LM step.

Run on purpose, never in the test suite:
    OMP_NUM_THREADS=1 python -m benchmarks.align_step --preset embedded --corpus ntrex:../shared/data/ntrex128 \
        --target hi
Both steps use the same model with the same LoRA attached, the same batch (the target-language sentences
and their English parallels, the first training batch `toolkit.align.Trainer` would draw), the same AdamW
engine, after one warm-up step each; the alignment step is `toolkit.align.optimizer_step`, the one training
runs. The plain step is next-token cross-entropy on both halves of the batch, as a LoRA fine-tune would do.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.ladder import median_seconds
from toolkit import align
from toolkit.capture import TokenBatch
from toolkit.config import Config, aligned_layers
from toolkit.corpus import Corpus
from toolkit.languages import REFERENCE
from toolkit.models import LoadedModel
from toolkit.sae_set import SAESet


def _lm_step(objective: align.Objective, eng, micro: list[tuple[TokenBatch, TokenBatch, str]]) -> float:
    """A plain LoRA LM step: next-token cross-entropy on the target and the English sentences, computed as the
    alignment objective computes its own CE term (LM head on real tokens only), so the ratio isolates the rest."""
    total = 0.0
    for target, english, _ in micro:
        loss = sum(objective.next_token_ce(objective.forward_pass(eng.forward, b, [])[1], b) for b in (target, english))
        eng.backward(loss)
        eng.micro_step()
        total += loss.item()
    return total


def align_step_ratio(cfg: Config, lm: LoadedModel, saes: SAESet, corpus: Corpus, target: str,
                     repeats: int = 3, summarise: bool | None = None) -> dict:
    """Median seconds of one alignment optimizer step vs one plain LoRA LM step (next-token CE, same LoRA, same
    target+English sentences, same optimizer), after one warm-up step each. Returns {"align_step_s", "lm_step_s",
    "align_step_ratio", "batch_size", "tokens", "align_layers": [...]}

    Also: "reference_s", the seconds the base model's English reference for the batch costs (training computes it
    once per sentence before its first step, so it is not part of a step), "align_step_cold_ratio" =
    (align_step_s + reference_s) / lm_step_s (a step that computed its reference inline, as a one-epoch run pays
    on average), "kl_summarised" and "reference_uses" (how the KL's base side is kept: `summarise` None decides
    as training does, from the uses per English sentence). `lm.model` is left as it came (LoRA removed).
    """
    a = cfg.align
    layers = [layer for layer in aligned_layers(a.align_layers, lm.n_layers) if layer in saes.layers]
    split = align.split_ids(corpus.ids, a.heldout, a.val_fraction, cfg.run.seed)
    ids = align.batch_ids(split.train, 0, a.batch_size, cfg.run.seed, target)
    texts = {lang: dict(corpus.sentences(lang)) for lang in (target, REFERENCE)}
    micro = [(*(align.collate(lm.tokenizer, [(s, texts[lang][s]) for s in ids], cfg.extract.max_length)
                for lang in (target, REFERENCE)), target)]
    torch.manual_seed(cfg.run.seed)
    base = lm.model
    model = align.attach_lora(base, a, lm.n_layers)
    try:
        peft_lm = dataclasses.replace(lm, model=model)
        uses = align.reference_uses(a, len(split.train))
        if summarise is None:  # as training would decide
            summarise = uses >= align.SUMMARY_USES
        objective = align.Objective(peft_lm, saes, {target: align.weights_from_gaps(None, layers)}, a, summarise)
        eng = align.TorchEngine(model, a, 1, align.Dist())
        eng.train(True)
        reference = objective.reference

        def cold_reference() -> None:
            reference.clear()
            for _, english, _ in micro:
                reference.get(english)

        # training fills the base model's English reference before its first step: time it apart
        reference_s = median_seconds(cold_reference, repeats, lm.device)
        align_s = median_seconds(lambda: align.optimizer_step(objective, eng, micro), repeats, lm.device)
        lm_s = median_seconds(lambda: _lm_step(objective, eng, micro), repeats, lm.device)
    finally:
        lm.model = model.unload()
    t, e, _ = micro[0]
    return {"align_step_s": align_s, "lm_step_s": lm_s, "align_step_ratio": align_s / lm_s,
            "reference_s": reference_s, "align_step_cold_ratio": (align_s + reference_s) / lm_s,
            "batch_size": len(ids), "tokens": {"target": t.n_real, "english": e.n_real,
                                               "padded": t.n_padded + e.n_padded},
            "align_layers": layers, "kl_summarised": objective.reference.linear, "reference_uses": uses}


def main() -> None:
    from benchmarks.ladder import calibration_batches, jumprelu_saes, plan
    from toolkit import corpus as corpora
    from toolkit import models
    from toolkit import saes as sae_sources
    from toolkit.rundir import RunDir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="embedded")
    p.add_argument("--corpus", default="embedded")
    p.add_argument("--target", default="hi")
    p.add_argument("--sae", default="jumprelu",
                   help="jumprelu: random JumpReLU SAEs at a realistic L0, as extract_throughput uses; "
                        "or any --sae source of the pipeline")
    p.add_argument("--sae-width", type=int, default=16384, help="Gemma Scope's width by default")
    p.add_argument("--batch-size", type=int, default=None, help="align.batch_size (default: the config's)")
    p.add_argument("--max-sentences", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kl", choices=("auto", "summary", "recompute"), default="auto",
                   help="how the KL's base side is kept (auto: as training decides from the uses per sentence)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as run:
        values = {"run": {"run": run, "langs": args.target, "corpus": args.corpus,
                          "max_sentences": args.max_sentences},
                  "sae": {"source": "random" if args.sae == "jumprelu" else args.sae, "width": args.sae_width}}
        if args.batch_size:
            values["align"] = {"batch_size": args.batch_size}
        cfg = Config.build(values, preset=args.preset)
        corpus = corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)
        lm = models.load(cfg.model)
        layers = aligned_layers(cfg.align.align_layers, lm.n_layers)
        if args.sae == "jumprelu":
            sae_set = jumprelu_saes(lm, layers, args.sae_width, 64, calibration_batches(plan(cfg, lm, corpus)))
        else:
            sae_set = sae_sources.load(cfg.sae_setup, lm, layers, corpus, RunDir(run))
        r = align_step_ratio(cfg, lm, sae_set, corpus, args.target, args.repeats,
                             None if args.kl == "auto" else args.kl == "summary")
    kl = "summarised" if r["kl_summarised"] else "recomputed"
    table = Table(title=f"alignment step vs plain LoRA LM step ({cfg.model.name}, {args.target}, "
                        f"{torch.get_num_threads()} thread(s), KL base {kl}, {r['reference_uses']:.1f} uses/sentence)")
    for col in ("batch", "tokens target / en / padded", "SAE layers", "align step s", "LM step s", "ratio",
                "en reference s", "ratio with reference"):
        table.add_column(col, justify="right")
    tok = r["tokens"]
    table.add_row(str(r["batch_size"]), f"{tok['target']} / {tok['english']} / {tok['padded']}",
                  str(len(r["align_layers"])), f"{r['align_step_s']:.3f}", f"{r['lm_step_s']:.3f}",
                  f"{r['align_step_ratio']:.2f}", f"{r['reference_s']:.3f}", f"{r['align_step_cold_ratio']:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
