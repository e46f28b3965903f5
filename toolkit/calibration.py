"""How fast this machine runs the model: a few seconds of measured passes, cached per machine and model.

`--dry-run` turns a stage's plan (tokens, steps, items) into an estimated wall time with these rates.
Method: random token ids in batches of CAL_BATCH x CAL_LENGTH, one warm-up pass, then the median of
CAL_REPEATS timed passes (perf_counter) of each kind: the decoder stack alone (extraction's forward), the
whole model with its LM head (benchmark scoring, bits per byte), the whole model forward and backward
(an alignment step), an SAE encode matmul, and a few steps of the local SAE trainer. The rates hold for
the threads, device and dtype measured with; the cache key names them.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from toolkit.config import Config, cache_dir

CAL_BATCH, CAL_LENGTH, CAL_REPEATS = 2, 128, 3
SAE_CAL_STEPS = 20
CAL_VERSION = 2  # part of the cache key: rates measured another way are measured again
METHOD = (
    f"median of {CAL_REPEATS} timed passes of {CAL_BATCH}x{CAL_LENGTH} random tokens after a warm-up "
    f"(decoder; model with LM head, and forward+backward, on 1x{CAL_LENGTH}), an SAE encode matmul and "
    f"{SAE_CAL_STEPS} SAE training steps, measured once on this machine and cached"
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

    lm = models.load(cfg.model)
    vocab = lm.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(min(10, vocab - 1), vocab, (CAL_BATCH, CAL_LENGTH), generator=gen).to(lm.device)
    n = ids.numel()
    decoder = lm.model.get_decoder() if hasattr(lm.model, "get_decoder") else lm.model
    one = ids[:1]
    with torch.inference_mode():
        dec = _median_seconds(lambda: decoder(input_ids=ids, use_cache=False))
        full = _median_seconds(lambda: lm.model(input_ids=one, use_cache=False))
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
        key_of(cfg),
        n / dec,
        one.numel() / full,
        one.numel() / train,
        enc / (512 * cfg.sae.width),
        _sae_samples_per_second(cfg, lm),
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def _sae_samples_per_second(cfg: Config, lm) -> float:
    """A few steps of the real local trainer (sae-lens) on random activations of the model's width."""
    import sae_lens  # noqa: F401  (its import, ~10 s, is not a training cost)
    import torch

    from toolkit import sae_training

    batch = cfg.sae.batch
    acts = torch.randn(batch * 8, lm.d_model, generator=torch.Generator().manual_seed(1))
    size = sae_training.Sizes(cfg.sae.width, len(acts), batch * SAE_CAL_STEPS)
    start = time.perf_counter()
    sae_training.train_one(cfg.sae_setup, lm, 0, acts, size)
    return size.samples / (time.perf_counter() - start)
