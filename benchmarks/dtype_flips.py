"""Which compute dtype to measure in: float32 vs bfloat16 on the same sentences, the same SAEs.

    python -m benchmarks.dtype_flips [--model embedded] [--layers 3,9,15] [--sentences 24] [--langs en,hi]

For each layer: the share of features active in float32 that bfloat16 turns off or on (JumpReLU SAEs
calibrated to ~64 active features per token, Gemma Scope's architecture), the relative change of the
mass, and each language's mass gap vs the first language under both dtypes. Prints a table; with
--json writes it too. Run on purpose: bfloat16 is ~6x slower than float32 on CPUs without AVX512-BF16.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from analysis.arithmetic import gap_pct
from benchmarks.ladder import calibration_batches, jumprelu_saes, plan
from toolkit import corpus as corpora
from toolkit import models
from toolkit.config import Config
from toolkit.layers import parse_layers
from toolkit.sae_set import SAESet


def active_sets(lm, saes: SAESet, batches, layers: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (token, feature) keys of every active code and the per-token mass, in batch order."""
    from toolkit.extraction import encode_batch

    out: dict[int, tuple[list, list]] = {i: ([], []) for i in layers}
    offset = 0
    for batch in batches:
        encoded = encode_batch(lm, saes, batch, layers, save_resid=False)
        n_tok = int(encoded.lengths.sum())
        for layer in layers:
            lb = encoded.layers[layer]
            rows = torch.repeat_interleave(torch.arange(n_tok), torch.as_tensor(lb.indptr).diff())
            keys = (rows + offset) * saes.layers[layer].d_sae + torch.as_tensor(lb.indices).long()
            out[layer][0].append(keys)
            out[layer][1].append(torch.as_tensor(lb.mass) * torch.as_tensor(encoded.lengths))
        offset += n_tok
    return {i: (torch.cat(k), torch.cat(m)) for i, (k, m) in out.items()}


def compare(cfg: Config, layers: list[int], langs: list[str]) -> list[dict]:
    corpus = corpora.load(cfg.run.corpus, langs, cfg.run.max_sentences)
    results: dict[str, dict] = {}
    saes_state = None
    for dtype in ("float32", "bfloat16"):
        lm = models.load(dataclass_replace(cfg.model, dtype=dtype))
        batches = plan(cfg, lm, corpus)
        saes = jumprelu_saes(lm, layers, 16384, 64, calibration_batches(batches))
        if saes_state is None:  # the same SAEs in both dtypes: bfloat16 rounds the float32 weights
            saes_state = {i: {k: v.float().clone() for k, v in saes.layers[i].sae.state_dict().items()} for i in layers}
        for i in layers:
            saes.layers[i].sae.load_state_dict({k: v.to(lm.dtype) for k, v in saes_state[i].items()})
            saes.layers[i].mean = saes.layers[i].mean.float()
        results[dtype] = {lang: active_sets(lm, saes, batches[lang], layers) for lang in langs}
    rows = []
    for layer in layers:
        row = {"layer": layer}
        for lang in langs:
            (k32, m32), (k16, m16) = results["float32"][lang][layer], results["bfloat16"][lang][layer]
            off = 1 - torch.isin(k32, k16).float().mean().item()
            on = 1 - torch.isin(k16, k32).float().mean().item()
            row[f"{lang}_flipped"] = (off * len(k32) + on * len(k16)) / max(len(k32), 1)
            row[f"{lang}_mass_change_pct"] = gap_pct(m16.sum().item(), m32.sum().item())
        for lang in langs[1:]:
            for dtype in ("float32", "bfloat16"):
                ref = results[dtype][langs[0]][layer][1]
                own = results[dtype][lang][layer][1]
                row[f"{lang}_gap_{dtype}"] = gap_pct(own.mean().item(), ref.mean().item())
        rows.append(row)
    return rows


def dataclass_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dtype_flips", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--layers", default="3,9,15")
    parser.add_argument("--sentences", type=int, default=24)
    parser.add_argument("--langs", default="en,hi")
    parser.add_argument("--corpus", default="embedded")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    cfg = Config.build({"run": {"corpus": args.corpus, "max_sentences": args.sentences, "langs": args.langs},
                        "model": {"name": args.model}}, preset="tiny" if args.model == "tiny" else "embedded")
    langs = cfg.lang_codes
    probe = models.load(cfg.model)
    layers = parse_layers(args.layers, probe.n_layers)
    del probe
    rows = compare(cfg, layers, langs)
    table = Table(title=f"float32 vs bfloat16 · {args.model} · {args.sentences} sentences · JumpReLU 16k, L0≈64")
    for key in rows[0]:
        table.add_column(key.replace("_", " "), justify="right")
    for row in rows:
        table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()))
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
