"""The extraction ladder: forward (A), + capture (B), SAE encode alone (F), full pipeline (P), on the same batches.

Shared by `benchmarks.extract_throughput` (CPU, the embedded and tiny models) and `benchmarks.paper_gpu`
(Gemma-2-2B size on a GPU). Throughput counts real (non-pad) tokens, BOS included, the same count for
every rung; each rung is timed as the median of `repeats` runs after one warm-up run.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from toolkit.capture import ResidualCapture, TokenBatch, hook_name, iter_batches
from toolkit.config import Config
from toolkit.corpus import Corpus
from toolkit.extraction import Extraction, ExtractionUnit, controls, extract_unit
from toolkit.models import LoadedModel
from toolkit.rundir import RunDir
from toolkit.sae_set import LayerSAE, SAESet

CALIBRATION_TOKENS = 1024  # per batch and layer: enough for the quantiles, small on a GPU at 26 x 2304


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of `fn` over `repeats` runs after one warm-up run (CUDA work is waited for)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def plan(cfg: Config, lm: LoadedModel, corpus: Corpus) -> dict[str, list[TokenBatch]]:
    """The batches `toolkit.extraction` makes for each language of the corpus (same plan, same padding)."""
    return {lang: list(iter_batches(corpus.sentences(lang), lm.tokenizer, cfg.extract.batch_tokens,
                                    cfg.extract.max_length)) for lang in corpus.langs}


def calibration_batches(batches: dict[str, list[TokenBatch]], per_language: int = 2) -> list[TokenBatch]:
    """A few batches of every language: residual statistics differ by script, most of all in early layers."""
    return [b for bs in batches.values() for b in bs[:per_language]]


def jumprelu_saes(lm: LoadedModel, layers: list[int], width: int, l0: int, calibration: list[TokenBatch],
                  seed: int = 0) -> SAESet:
    """Random JumpReLU SAEs (Gemma Scope's architecture) whose thresholds give about `l0` active features.

    Random ReLU SAEs fire on half their features, which would make every sparse cost 100x too large;
    real SAEs at 16k width fire on tens. Each feature's threshold is set at the (1 - l0/width) quantile of
    its pre-activation on the calibration batches, and b_dec at the mean residual, as trained SAEs have it.
    """
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    acts: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    with torch.inference_mode(), ResidualCapture(lm, layers, lambda i, h, keep=None: None) as cap:
        for batch in calibration:
            keep = batch.keep.to(lm.device)
            cap.sink = lambda i, h, keep=keep: acts[i].append(h[keep][:CALIBRATION_TOKENS].float())
            cap.run(batch)
    out = {}
    for layer in layers:
        x = torch.cat(acts.pop(layer))
        torch.manual_seed(seed * 1000 + layer)
        cfg = JumpReLUSAEConfig(d_in=lm.d_model, d_sae=width, device=str(lm.device))
        cfg.metadata.hook_name = hook_name(layer)
        sae = JumpReLUSAE(cfg)
        with torch.no_grad():
            sae.b_dec.copy_(x.mean(0))
            pre = (x - sae.b_dec) @ sae.W_enc
            k = max(1, min(len(x), round(len(x) * (1 - l0 / width))))
            sae.threshold.copy_(pre.kthvalue(k, dim=0).values.clamp_min(0))
        out[layer] = LayerSAE(layer, sae.to(lm.dtype).eval(), f"random-jumprelu:l0={l0}/layer_{layer}",
                              mean=x.mean(0), mean_source="calibration batches")
    return SAESet(f"random-jumprelu:seed{seed},width{width},l0{l0}", out)


def run_ladder(cfg: Config, lm: LoadedModel, saes: SAESet, corpus: Corpus, layers: list[int], repeats: int,
               work_dir: Path) -> dict:
    """Tokens/s of A, B, F, P and the derived floor and ratios; P's last files stay under `work_dir`."""
    batches = plan(cfg, lm, corpus)
    flat = [b for bs in batches.values() for b in bs]
    tokens = sum(b.n_real for b in flat)
    base = lm.model.get_decoder()
    moved = [(b.input_ids.to(lm.device), b.attention_mask.to(lm.device), b.keep.to(lm.device)) for b in flat]

    def forward() -> None:
        with torch.inference_mode():
            for ids, mask, _ in moved:
                base(input_ids=ids, attention_mask=mask, use_cache=False)

    captured: list[dict[int, torch.Tensor]] = []

    def capture(keep_all: bool = False) -> None:
        captured.clear()
        with torch.inference_mode(), ResidualCapture(lm, layers, lambda i, h: None) as cap:
            for batch, (_, _, keep) in zip(flat, moved):
                per_layer: dict[int, torch.Tensor] = {}
                # the pipeline's sink starts the same way: the real tokens of the layer, in compute dtype
                cap.sink = lambda i, h, keep=keep, per_layer=per_layer: per_layer.__setitem__(i, h[keep])
                cap.run(batch)
                if keep_all:
                    captured.append(per_layer)

    def encode() -> None:
        with torch.inference_mode():
            for per_layer in captured:
                for layer, x in per_layer.items():
                    saes.layers[layer].encode_sparse(x)

    def encode_and_controls() -> None:
        with torch.inference_mode():
            for per_layer in captured:
                for layer, x in per_layer.items():
                    layer_sae = saes.layers[layer]
                    rows, cols, values = layer_sae.encode_sparse(x)
                    controls(layer_sae, x, rows, cols, values.float())

    reps = itertools.count()

    def pipeline() -> None:
        run = work_dir / f"rep{next(reps)}"
        job = Extraction(cfg.extract, RunDir(run).activations, cfg.run.preset, cfg.model.adapter)
        for lang in batches:
            extract_unit(job, lm, saes, corpus, ExtractionUnit(lang), layers)

    a = tokens / median_seconds(forward, repeats, lm.device)
    b = tokens / median_seconds(capture, repeats, lm.device)
    capture(keep_all=True)
    f = tokens / median_seconds(encode, repeats, lm.device)
    fc = tokens / median_seconds(encode_and_controls, repeats, lm.device)
    captured.clear()
    p = tokens / median_seconds(pipeline, repeats, lm.device)
    floor = 1 / (1 / a + 1 / f)
    return {
        "tokens": tokens, "batches": len(flat), "padded_tokens": sum(b.n_padded for b in flat),
        "forward_tps": a, "capture_tps": b, "encode_tps": f, "pipeline_tps": p, "floor_tps": floor,
        "encode_controls_tps": fc, "controls_cost_over_encode": f / fc - 1,
        "capture_over_forward": b / a, "pipeline_over_floor": p / floor,
        "files": sorted(str(p) for p in (work_dir / f"rep{repeats}" / "activations").glob("*.h5")),
    }


def scratch_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="lingogap-bench-")
