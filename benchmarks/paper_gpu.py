"""The extraction ladder at the `paper` size on one GPU: Gemma-2-2B architecture, 26 JumpReLU SAEs of 16k, bf16.

    python -m benchmarks.paper_gpu --json paper_gpu.json          # one H100: a few minutes
    python -m benchmarks.paper_gpu --reduced --device cpu         # the same code path, small, on CPU (tested)

Weights are random (nothing to download): throughput depends on shapes, not values. The text is the
embedded corpus read through the tiny model's byte-level tokenizer (Gemma's tokenizer is on the hub),
so sentences are longer in tokens than with Gemma's, and truncated at `extract.max_length` as usual.
Prints A (forward), F (SAE encode), P (full pipeline to HDF5) and P/floor; see benchmarks/ladder.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.extract_throughput import machine
from benchmarks.ladder import calibration_batches, jumprelu_saes, plan, run_ladder, scratch_dir
from toolkit import corpus as corpora
from toolkit import models
from toolkit.config import Config
from toolkit.models import LoadedModel

# google/gemma-2-2b's config.json, and a shape that runs in seconds on a CPU for the test.
PAPER = {"hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
         "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 256000, "sliding_window": 4096}
REDUCED = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 2,
           "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 512, "sliding_window": 64}


def random_gemma2(shape: dict, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(models.tiny_dir()))
    config = Gemma2Config(**shape, query_pre_attn_scalar=shape["head_dim"], pad_token_id=0, eos_token_id=1,
                          bos_token_id=2, attn_implementation="eager")  # softcapping: eager, as models.load
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma2ForCausalLM(config).to(dtype).eval()
    return LoadedModel(model, tokenizer, "gemma-2-2b-architecture-random", "random", device, dtype)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.paper_gpu", description=__doc__.splitlines()[0])
    p.add_argument("--reduced", action="store_true", help="a small model and SAEs: checks the script on a CPU")
    p.add_argument("--device", default="cuda")
    p.add_argument("--sentences", type=int, default=48, help="sentences per language of the embedded corpus")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-tokens", type=int, default=16384, help="padded tokens per forward batch")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device visible; pass --device cpu (with --reduced) to check the script on a CPU")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    shape, width = (REDUCED, 256) if args.reduced else (PAPER, 16384)
    result: dict = {**machine(), "model": "gemma-2-2b architecture, random weights", "shape": shape,
                    "sae_width": width, "dtype": str(dtype).removeprefix("torch."), "device": str(device)}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    with scratch_dir() as tmp:
        cfg = Config.build({"run": {"run": tmp, "langs": "all", "max_sentences": args.sentences},
                            "model": {"device": args.device},
                            "extract": {"batch_tokens": args.batch_tokens}}, preset="paper")
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, corpus="embedded"))
        corpus = corpora.load("embedded", cfg.lang_codes, args.sentences)
        lm = random_gemma2(shape, device, dtype)
        layers = list(range(lm.n_layers))
        calibration = calibration_batches(plan(cfg, lm, corpus), per_language=1)
        saes = jumprelu_saes(lm, layers, width, l0=64 if width > 1000 else 8, calibration=calibration)
        result.update({k: v for k, v in run_ladder(cfg, lm, saes, corpus, layers, args.repeats, Path(tmp)).items()
                       if k != "files"})
        if device.type == "cuda":
            result["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    table = Table(title=f"paper size ({result['model']}, {len(layers)} layers, SAE width {width}, {result['dtype']}, "
                        f"{result.get('gpu', result['device'])})")
    for col in ("A forward", "F encode", "P pipeline", "floor", "P/floor", "B/A"):
        table.add_column(col, justify="right")
    table.add_row(*(f"{result[k]:,.0f} tok/s" for k in ("forward_tps", "encode_tps", "pipeline_tps", "floor_tps")),
                  f"{result['pipeline_over_floor']:.2f}", f"{result['capture_over_forward']:.2f}")
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
