"""How fast this machine runs the model: a few seconds of measured passes, cached per machine and model.

`--dry-run` turns a stage's plan (tokens, steps, items) into an estimated wall time with these rates.
Method: random token ids in batches of CAL_BATCH x CAL_LENGTH, one warm-up pass, then the median of
CAL_REPEATS timed passes (perf_counter) of each kind: the decoder stack alone (extraction's forward), the
whole model with its LM head (benchmark scoring, bits per byte), the LM head alone on final hidden states
(alignment's KL summaries), the whole model forward and backward (an alignment step), an SAE encode matmul,
and a few steps of the local SAE trainer. Timed once each: a fresh interpreter importing what a job imports
(torch, transformers, peft, sae-lens, the toolkit), loading the model, and loading the trained SAE back as a
run's local SAEs are loaded (one layer). The rates hold for the threads, device and
dtype measured with; the cache key names them.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from toolkit.config import Config, cache_dir

CAL_BATCH, CAL_LENGTH, CAL_REPEATS = 2, 128, 3
SAE_CAL_STEPS = 20
CAL_VERSION = 3  # part of the cache key: rates measured another way are measured again
METHOD = (
    f"median of {CAL_REPEATS} timed passes of {CAL_BATCH}x{CAL_LENGTH} random tokens after a warm-up "
    f"(decoder; model with LM head, LM head alone, and forward+backward, on 1x{CAL_LENGTH}), an SAE encode matmul "
    f"and {SAE_CAL_STEPS} SAE training steps, and one timed start-up, model load and SAE load, measured once on "
    "this machine and cached"
)


@dataclass
class Rates:
    key: str  # machine, model, device, dtype, threads and SAE recipe measured with
    decoder_tps: float  # tokens/s through the decoder blocks (extraction's forward, no LM head)
    lm_tps: float  # tokens/s through the whole model with its LM head (scoring)
    train_tps: float  # tokens/s of forward + backward through the frozen model (an adapter's step: no weight grads)
    encode_s: float  # seconds per token per SAE feature of one layer's encode (addmm at d_model)
    sae_sps: float  # local SAE training samples/s at the configured width and batch
    measured: str  # when, in UTC
    head_tps: float  # tokens/s of the LM head alone on final hidden states (a KL summary is two such products)
    startup_s: float  # seconds for a fresh interpreter to import what a job imports
    load_s: float  # seconds to load the model (`models.load`)
    sae_load_s: float  # seconds to load one layer's local SAE (`sae_set.from_dir`)


def cache_file() -> Path:
    return cache_dir() / "calibration.json"


def key_of(cfg: Config) -> str:
    s = cfg.sae
    return (
        f"v{CAL_VERSION}|{platform.node()}|{cfg.model.name}|{cfg.model.device}|{cfg.model.dtype}|"
        f"threads={os.environ.get('OMP_NUM_THREADS', '')}|sae={s.arch}:{s.width}:{s.batch}"
    )


def cached(cfg: Config) -> Rates | None:
    try:
        entry = json.loads(cache_file().read_text()).get(key_of(cfg))
    except (OSError, ValueError):
        return None
    try:
        return Rates(**entry) if entry else None
    except TypeError:  # an entry from another version: measured again
        return None


def rates(cfg: Config, measure: bool = True) -> Rates | None:
    """The cached rates for this machine and config, measured now (a few seconds) when missing and `measure`."""
    found = cached(cfg)
    if found is not None or not measure:
        return found
    found = _measure(cfg)
    from toolkit.files import atomic_write

    try:
        table = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        table = {}
    table[found.key] = asdict(found)
    cache_file().parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache_file(), json.dumps(table, indent=1))
    return found


def _median_seconds(fn: Callable[[], object]) -> float:
    fn()
    times = []
    for _ in range(CAL_REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _measure(cfg: Config) -> Rates:
    import torch

    from toolkit import models

    startup_s = _startup_seconds()
    began = time.perf_counter()
    lm = models.load(cfg.model)
    load_s = time.perf_counter() - began
    vocab = lm.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(min(10, vocab - 1), vocab, (CAL_BATCH, CAL_LENGTH), generator=gen).to(lm.device)
    n = ids.numel()
    decoder = lm.model.get_decoder() if hasattr(lm.model, "get_decoder") else lm.model
    one = ids[:1]
    with torch.inference_mode():
        dec = _median_seconds(lambda: decoder(input_ids=ids, use_cache=False))
        full = _median_seconds(lambda: lm.model(input_ids=one, use_cache=False))
        states = decoder(input_ids=one, use_cache=False).last_hidden_state
        head = _median_seconds(lambda: lm.model.get_output_embeddings()(states))
    lm.model.requires_grad_(False)  # LoRA trains a few small matrices: activation gradients, no weight gradients

    def step() -> None:
        embeds = lm.model.get_input_embeddings()(one).detach().requires_grad_()
        lm.model(inputs_embeds=embeds, use_cache=False).logits.float().logsumexp(-1).mean().backward()

    with torch.enable_grad():
        train = _median_seconds(step)
    x = torch.randn(512, lm.d_model, generator=gen)
    w = torch.randn(lm.d_model, cfg.sae.width, generator=gen)
    b = torch.zeros(cfg.sae.width)
    enc = _median_seconds(lambda: torch.addmm(b, x, w))
    return Rates(
        key=key_of(cfg),
        decoder_tps=n / dec,
        lm_tps=one.numel() / full,
        train_tps=one.numel() / train,
        encode_s=enc / (512 * cfg.sae.width),
        measured=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        head_tps=one.numel() / head,
        startup_s=startup_s,
        load_s=load_s,
        **_sae_rates(cfg, lm),
    )


def _startup_seconds() -> float:
    """A fresh interpreter importing what every job imports: most of a job's start before its model loads."""
    began = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import sae_lens, toolkit.align, toolkit.models"], capture_output=True, check=False
    )
    return time.perf_counter() - began


def _sae_rates(cfg: Config, lm) -> dict[str, float]:
    """A few steps of the real local trainer (sae-lens) on random activations of the model's width (samples/s), and
    loading the trained SAE back as one layer of a run's local set is loaded."""
    import sae_lens  # noqa: F401  (its import, ~10 s, is a start-up cost, not a training cost)
    import torch

    from toolkit import sae_training
    from toolkit.sae_set import from_dir

    batch = cfg.sae.batch
    acts = torch.randn(batch * 8, lm.d_model, generator=torch.Generator().manual_seed(1))
    size = sae_training.Sizes(cfg.sae.width, len(acts), batch * SAE_CAL_STEPS)
    start = time.perf_counter()
    sae = sae_training.train_one(cfg.sae_setup, lm, 0, acts, size)
    sae_sps = size.samples / (time.perf_counter() - start)
    with tempfile.TemporaryDirectory(prefix="lingogap-calibration-") as tmp:
        sae.save_inference_model(str(Path(tmp) / "layer_0"))
        start = time.perf_counter()
        from_dir(Path(tmp), [0], lm)
        sae_load_s = time.perf_counter() - start
    return {"sae_sps": sae_sps, "sae_load_s": sae_load_s}
