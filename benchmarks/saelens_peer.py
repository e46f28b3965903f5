"""Peer for the extraction benchmark (issue 8): SAELens's own activation caching, one hook per run.

`saelens_cache_tps` runs sae-lens's `CacheActivationsRunner` the way its users do: texts are packed
into `context_size` rows by sae-lens's own `PretokenizeRunner` (what sae-lens recommends over
on-the-fly tokenization) and saved locally, then the cache runner loads the model, hooks one layer,
runs the forward passes and writes the activations as a `datasets` dataset on disk.

Choices, and why:
- Model wrapper `AutoModelForCausalLM` (sae-lens's `HookedProxyLM`, hook `model.layers.{layer}`, the
  decoder block's output = the residual stream after the block, what our pipeline captures). It loads
  any local HF folder offline, the tiny random Gemma-2 of the tests included; the default
  `HookedTransformer` only knows official hub names and would need a model object injected by hand.
  As in sae-lens, the forward stops after the hooked block and every submodule carries a hook point.
- Settings we change from the defaults, each for fairness or offline use: `device="cpu"`, the model
  in the benchmark's dtype (float32 by default, as sae-lens) with activations stored as float32;
  `model_batch_size` so that a batch holds at most `batch_tokens` tokens (1024 =
  the embedded preset's `extract.batch_tokens`), evened out over the rows; `training_tokens` = exactly
  the packed rows (rounded down to whole batches: fewer dropped rows than batches), and
  `buffer_size_gb` sized to one buffer holding exactly those tokens: the runner otherwise fills every
  2 GB buffer completely, silently re-reading the data (tokens cached twice would count twice);
  `PretokenizeRunner(num_proc=1)` (2-core machines). No hub upload. The saved rows go in as
  `override_dataset` (the runner's own argument), since `load_dataset` refuses a `save_to_disk`
  folder; hub datasets would stream instead. Left at their defaults: `shuffle=True` (an index
  permutation after writing, inside the timed call), `prepend_bos`, sae-lens's BOS/separator packing.
- `seconds` is the wall time of `CacheActivationsRunner.run()` only: forward passes, shard writing,
  consolidation, shuffle. Model load (in the runner's constructor) and tokenisation are excluded and
  returned separately as `init_seconds` and `tokenize_seconds`.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import torch

MAX_BUFFER_GB = 2.0  # sae-lens's default and documented ceiling: HF datasets writers fail on larger shards


def saelens_cache_tps(model_dir: str | Path, texts: list[str], layer: int, n_layers: int, context_size: int,
                      work_dir: str | Path, device: str = "cpu", batch_tokens: int = 1024,
                      dtype: str = "float32") -> dict:
    """Run sae-lens's CacheActivationsRunner for one hook on `texts`; return tokens, seconds and tokens/s.

    `all_layers_tps` is `one_layer_tps / n_layers`: a sae-lens user caches one hook per run, so all
    layers cost one run each. `dtype` is the model's compute dtype, passed to its `from_pretrained`;
    activations are stored as float32 either way (sae-lens's datasets writer has no bfloat16).
    `work_dir` gets `text/`, `tokens/` and `activations/` (replaced if there).
    Raises RuntimeError with one message when sae-lens cannot run offline here.
    """
    try:
        import datasets
        import sae_lens
        from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig, PretokenizeRunner
        from sae_lens.config import PretokenizeRunnerConfig
    except ImportError as exc:
        raise RuntimeError(f"sae-lens peer: cannot import sae-lens ({exc})") from None

    model_dir, work = Path(model_dir), Path(work_dir)
    if not (model_dir / "config.json").is_file():
        raise RuntimeError(f"sae-lens peer: {model_dir} is not a local HF model folder (no config.json)")
    d_model = int(json.loads((model_dir / "config.json").read_text())["hidden_size"])
    for part in ("text", "tokens", "activations"):  # ours from an earlier run; nothing else in work_dir
        shutil.rmtree(work / part, ignore_errors=True)
    (work / "text").mkdir(parents=True)
    text_file = work / "text" / "texts.jsonl"
    text_file.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    hook = f"model.layers.{layer}"
    step = "tokenising"
    try:
        start = time.perf_counter()
        PretokenizeRunner(PretokenizeRunnerConfig(
            tokenizer_name=str(model_dir), dataset_path="json", data_files=[str(text_file)], split="train",
            context_size=context_size, num_proc=1, save_path=str(work / "tokens"))).run()
        tokenize_seconds = time.perf_counter() - start
        token_rows = datasets.load_from_disk(str(work / "tokens"))
        n_rows = len(token_rows)
        cap = max(1, min(batch_tokens // context_size, n_rows))
        batch = -(-n_rows // -(-n_rows // cap))  # near the cap, dropping fewer rows than there are batches
        n_rows -= n_rows % batch
        if n_rows == 0:
            raise RuntimeError(f"sae-lens peer: the texts fill no {context_size}-token row; pass more text")
        bytes_per_token = d_model * 4  # stored as float32
        training_tokens = n_rows * context_size
        buffer_gb = (training_tokens * bytes_per_token + 0.5) / 1e9
        if buffer_gb > MAX_BUFFER_GB:
            raise RuntimeError(f"sae-lens peer: {training_tokens} tokens exceed one {MAX_BUFFER_GB} GB buffer; "
                               "pass fewer texts")
        cfg = CacheActivationsRunnerConfig(
            dataset_path=str(work / "tokens"), model_name=str(model_dir), model_class_name="AutoModelForCausalLM",
            model_batch_size=batch, hook_name=hook, d_in=d_model, training_tokens=training_tokens,
            context_size=context_size, new_cached_activations_path=str(work / "activations"), dtype="float32",
            model_from_pretrained_kwargs={"dtype": getattr(torch, dtype)},
            device=device, buffer_size_gb=buffer_gb)
        if (cfg.n_buffers, cfg.n_tokens_in_buffer) != (1, training_tokens):
            raise RuntimeError(f"sae-lens peer: buffer sizing failed ({cfg.n_buffers} buffers of "
                               f"{cfg.n_tokens_in_buffer} tokens for {training_tokens})")
        step = "loading the model"
        start = time.perf_counter()
        with warnings.catch_warnings():  # it compares rows with tokens: a false "multiple epochs" alarm
            warnings.filterwarnings("ignore", message="The training dataset contains fewer samples")
            runner = CacheActivationsRunner(cfg, override_dataset=token_rows)
        init_seconds = time.perf_counter() - start
        if hook not in runner.model.hook_dict:
            raise RuntimeError(f"sae-lens peer: the model has no module {hook!r} to hook")
        step = "caching activations"
        start = time.perf_counter()
        cached = runner.run()
        seconds = time.perf_counter() - start
    except RuntimeError as exc:
        if str(exc).startswith("sae-lens peer:"):
            raise
        raise RuntimeError(f"sae-lens peer: {step} failed offline ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # noqa: BLE001 - any failure inside sae-lens, hub access included, becomes one message
        raise RuntimeError(f"sae-lens peer: {step} failed offline ({type(exc).__name__}: {exc})") from None

    rows, width, dim = len(cached), *cached.features[hook].shape
    if (width, dim) != (context_size, d_model):
        raise RuntimeError(f"sae-lens peer: cached rows are {width}x{dim}, expected {context_size}x{d_model}")
    tokens = rows * width
    one_layer_tps = tokens / seconds
    return {"tokens": tokens, "seconds": seconds, "one_layer_tps": one_layer_tps,
            "all_layers_tps": one_layer_tps / n_layers, "hook": hook, "runner": "sae_lens.CacheActivationsRunner",
            "sae_lens_version": sae_lens.__version__, "init_seconds": init_seconds,
            "tokenize_seconds": tokenize_seconds, "model_batch_size": batch,
            "activations_dir": str(work / "activations")}


def saelens_every_layer(model_dir: str | Path, texts: list[str], n_layers: int, context_size: int,
                        work_dir: str | Path, dtype: str = "float32") -> dict:
    """One peer run per layer, as a user caching every layer would do: measured, not extrapolated.

    `all_layers_tps` is tokens over the summed run seconds. `one_pass_ceiling` is that sum over the last
    layer's run, which is one full forward pass: what a tool capturing every layer in one pass could at
    most gain over the peer if capture, encode and writing cost nothing beyond the peer's own.
    """
    runs = [saelens_cache_tps(model_dir, texts, layer=layer, n_layers=n_layers, context_size=context_size,
                              work_dir=work_dir, dtype=dtype) for layer in range(n_layers)]
    seconds = [r["seconds"] for r in runs]
    return {"seconds_per_layer": seconds, "init_seconds_per_layer": [r["init_seconds"] for r in runs],
            "tokens": runs[0]["tokens"], "all_layers_tps": runs[0]["tokens"] / sum(seconds),
            "one_pass_ceiling": sum(seconds) / seconds[-1]}
