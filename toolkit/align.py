"""Activation-aware LoRA alignment: data split, layer weights, objective, engines, checkpoints, training.

The objective for a target language T and the parallel English sentences (defaults; each weight in
`AlignConfig`):

    loss  = CE(T) + lambda_align * align + lambda_keep * keep
    align = (1/|L|) * sum over layers l in L of w_l * d(pool(SAE_l(h_l(T))), pool(SAE_l(h_l^base(en))))
    keep  = KL(p_base || p_adapted) per English token, averaged over real tokens

- h_l is the residual stream after decoder block l (the extraction hook point); pool is the mean over
  the sentence's tokens with BOS and padding excluded, the tokens extraction measures.
- The English codes and the KL's base logits come from the base model (adapter disabled, no second
  copy) under no_grad: a fixed target, so the adapter cannot close the gap by moving English. Being
  fixed, they are computed once per sentence before training (`EnglishReference`), not in every step.
- d = "mse" (default): the relative squared error sum_b ||p_T - p_en||^2 / sum_b ||p_en||^2 per layer.
  SAE code magnitudes grow with depth, so a raw MSE would let deep layers dominate; relative to the
  target's energy, w_l alone sets a layer's importance. d = "cosine": mean over the batch of 1 - cos.
- w_l ("gap", default) = max(0, -gap_l) with gap_l T's measured mass gap to English in percent,
  scaled to mean 1 over the chosen layers (so "uniform" is all ones and lambda_align means the same
  for both); layers where T is not weaker get 0; if none is weaker, weights fall back to uniform.
- The SAEs are frozen; gradients flow through their encoders into the LoRA parameters only.

Cost: a step is the adapted target pass (with SAE encodes) and the adapted English pass, forward and
backward; logits are formed for real tokens only (`python -m benchmarks.align_step` compares a step
with a plain LoRA LM step).

Training is deterministic for a given seed: batches are a pure function of the step (seeded epoch
permutations), and checkpoints hold adapter, optimizer, scheduler, step, loss history and every
rank's RNG states, written to a temporary folder and renamed, so a killed run resumes exactly.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
import logging
import math
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from toolkit.capture import ResidualCapture, TokenBatch, iter_batches, tokenize
from toolkit.config import AlignConfig, Config
from toolkit.corpus import Corpus
from toolkit.errors import UserError
from toolkit.models import LoadedModel
from toolkit.saes import SAESet

REFERENCE = "en"
MAX_GRAD_NORM = 1.0
WARMUP_STEPS = 10  # linear warmup (at most a tenth of the run), then constant: extending `steps` keeps resuming
KEEP_CHECKPOINTS = 2
TERMS = ("ce", "align", "keep", "total")
KL_CHUNK_CPU = 1 << 20  # logits per chunk of the KL term: 4 MiB of fp32 stays in a CPU's cache
KL_CHUNK = 1 << 28  # on accelerators, few large kernels
SUMMARY_USES = 2.0  # the KL's base summary costs about two uses' worth of base logits (measured on CPU)
HEAD_CHUNK = 1 << 24  # logits per chunk where the LM head runs inside the chunk loop (64 rows of Gemma's 262k)


# ----------------------------------------------------------------------------------------------- data


@dataclass
class Split:
    """Sentence ids by role. Held-out ids are only used for the before/after measurement."""

    train: list[str]
    val: list[str]
    heldout: list[str]

    def to_dict(self) -> dict:
        return {"train": len(self.train), "val": len(self.val), "heldout": len(self.heldout),
                "heldout_sha256": ids_hash(self.heldout), "train_sha256": ids_hash(self.train)}


def ids_hash(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def split_ids(ids: list[str], heldout: float, val_fraction: float, seed: int) -> Split:
    """Seeded split by sentence id: `heldout` of all ids, then `val_fraction` of the rest; disjoint.

    Ids are ranked by a hash of (seed, id), so the same sentence lands in the same role in every
    language, and each list keeps corpus order.
    """
    rank = sorted(ids, key=lambda sid: hashlib.sha256(f"{seed}\t{sid}".encode()).digest())
    n_held = _share(len(rank), heldout, leave=1)
    n_val = _share(len(rank) - n_held, val_fraction, leave=1)
    held, val = set(rank[:n_held]), set(rank[n_held:n_held + n_val])
    split = Split([s for s in ids if s not in held and s not in val], [s for s in ids if s in val],
                  [s for s in ids if s in held])
    if not split.train:
        raise UserError(f"align: {len(ids)} sentence(s) leave no training sentences after the held-out and "
                        "validation split; use more sentences or lower align.heldout / align.val_fraction")
    return split


def _share(n: int, fraction: float, leave: int) -> int:
    """round(n * fraction), at least 1 when the fraction is positive, leaving `leave` items."""
    if fraction <= 0 or n <= leave:
        return 0
    return min(max(1, round(n * fraction)), n - leave)


@functools.lru_cache(maxsize=64)
def _permutation(n: int, seed: int, salt: str, epoch: int) -> list[int]:
    key = int.from_bytes(hashlib.sha256(f"{seed}/{salt}/{epoch}".encode()).digest()[:8], "big") >> 1
    return torch.randperm(n, generator=torch.Generator().manual_seed(key)).tolist()


def batch_ids(ids: list[str], index: int, size: int, seed: int, salt: str = "") -> list[str]:
    """Batch `index` of an endless stream of seeded epoch permutations of `ids`.

    A pure function of its arguments, so a resumed run draws exactly the batches an uninterrupted
    one would, and ranks draw disjoint slices by taking different indices.
    """
    out = []
    for k in range(index * size, (index + 1) * size):
        epoch, pos = divmod(k, len(ids))
        out.append(ids[_permutation(len(ids), seed, salt, epoch)[pos]])
    return out


def collate(tokenizer, sentences: list[tuple[str, str]], max_length: int) -> TokenBatch:
    """Right-padded batch in the given order (BOS first), padded to its longest sentence."""
    ids = tokenize(tokenizer, [text for _, text in sentences], max_length)
    width = max(len(t) for t in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, t in enumerate(ids):
        input_ids[row, :len(t)] = torch.tensor(t)
        mask[row, :len(t)] = 1
    return TokenBatch([sid for sid, _ in sentences], input_ids, mask)


# -------------------------------------------------------------------------------------- layer weights


def gaps_from_csv(path: Path, lang: str, layers: list[int], stat: str = "mass") -> dict[int, float] | None:
    """gap_pct per layer from the report stage's gaps.csv, or None when it lacks a layer."""
    if not path.is_file():
        return None
    found: dict[int, float] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("language") == lang and row.get("statistic") == stat and row.get("gap_pct", "") != "":
                found[int(row["layer"])] = float(row["gap_pct"])
    return found if all(layer in found for layer in layers) else None


def gaps_from_activations(run_dir: Path, lang: str, layers: list[int], ids: list[str] | None = None,
                          stat: str = "mass", reference: str = REFERENCE) -> dict[int, float] | None:
    """Gap per layer from RUN/activations: A = mean per-sentence statistic over the sentences both
    languages have (restricted to `ids` when given); None when files, layers or sentences are missing."""
    from toolkit.store import ActivationFile, StoreError, activation_files

    files = activation_files(run_dir)
    if lang not in files or reference not in files:
        return None
    values: dict[str, dict[str, np.ndarray]] = {}
    try:
        for code in (lang, reference):
            rows: dict[str, list[float]] = {}
            for path in files[code]:
                with ActivationFile(path) as f:
                    if not set(layers) <= set(f.layers):
                        return None
                    stats = np.stack([f.stats(layer, stat) for layer in layers], axis=1)
                    rows.update(zip(f.sentence_ids, stats, strict=True))
            values[code] = rows
    except StoreError:
        return None
    common = set(values[lang]) & set(values[reference])
    if ids is not None:
        common &= set(ids)
    if len(common) < 2:
        return None
    order = sorted(common)
    a_lang = np.mean([values[lang][s] for s in order], axis=0)
    a_ref = np.mean([values[reference][s] for s in order], axis=0)
    return {layer: gap_pct(a_lang[k], a_ref[k]) for k, layer in enumerate(layers)}


def gap_pct(value: float, reference: float) -> float:
    return float(100.0 * (value - reference) / reference) if reference else math.nan


def weights_from_gaps(gaps: dict[int, float] | None, layers: list[int], mode: str = "gap") -> dict[int, float]:
    """w_l = max(0, -gap_l) scaled to mean 1 over `layers`; all ones for "uniform" or when no layer
    is weaker than English (or gaps are unknown)."""
    uniform = dict.fromkeys(layers, 1.0)
    if mode == "uniform" or not gaps:
        return uniform
    raw = {layer: max(0.0, -gaps[layer]) if math.isfinite(gaps.get(layer, math.nan)) else 0.0 for layer in layers}
    total = sum(raw.values())
    if total <= 0:
        return uniform
    return {layer: raw[layer] * len(layers) / total for layer in layers}


# ------------------------------------------------------------------------------------------ objective


def attach_lora(model: torch.nn.Module, a: AlignConfig, n_layers: int) -> torch.nn.Module:
    """Wrap `model` in a peft LoRA model (B = 0 at start, so it begins as the base model)."""
    from peft import LoraConfig, get_peft_model

    from toolkit.config import parse_layers

    targets = [t.strip() for t in a.lora_targets.split(",") if t.strip()]
    layers = parse_layers(a.lora_layers, n_layers)
    config = LoraConfig(
        r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout, target_modules=targets,
        layers_to_transform=None if len(layers) == n_layers else layers,
        layers_pattern=None if len(layers) == n_layers else "layers", task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # peft names the modules it could not find
        raise UserError(f"align.lora_targets {a.lora_targets!r}: {exc}") from None


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors as peft saves them (adapter name stripped), detached copies on the CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


def state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Objective:
    """The alignment loss for one batch of parallel sentences; see the module docstring.

    The English side of every term but the adapted KL comes from the frozen base model, so it is computed
    once per sentence (`EnglishReference`) instead of in every step, and every step's work is the adapted
    passes alone. Logits (a 262k vocabulary on Gemma) are computed for real tokens only, never for padding.
    """

    def __init__(self, lm: LoadedModel, saes: SAESet, weights: dict[str, dict[int, float]], a: AlignConfig,
                 summarise: bool = True):
        """`summarise`: keep the KL's base distributions as summaries where the LM head allows it (see
        `EnglishReference`); worth it when each English sentence is used at least `SUMMARY_USES` times."""
        self.lm = lm  # lm.model is the peft model: its hooks see base and adapted passes alike
        self.saes = saes
        self.weights = weights
        self.a = a
        for s in saes.layers.values():
            s.sae.requires_grad_(False)
        aligned = sorted({layer for lang in weights for layer in self.layers(lang)}) if a.lambda_align > 0 else []
        self.reference = EnglishReference(self, aligned, keep=a.lambda_keep > 0, summarise=summarise)

    def layers(self, lang: str) -> list[int]:
        return [layer for layer, w in sorted(self.weights[lang].items()) if w > 0]

    def __call__(self, forward: Callable, target: TokenBatch, english: TokenBatch,
                 lang: str) -> dict[str, torch.Tensor]:
        a = self.a
        layers = self.layers(lang) if a.lambda_align > 0 else []
        need_keep = a.lambda_keep > 0
        en_codes = self.reference.get(english)
        codes, hidden = self.forward_pass(forward, target, layers)
        ce = self.next_token_ce(hidden, target)
        zero = ce.new_zeros(())
        align = zero
        if layers:
            w = self.weights[lang]
            align = sum(w[layer] * _distance(codes[layer], en_codes[layer], a.distance) for layer in layers)
            align = align / len(self.weights[lang])
        keep = zero
        if need_keep:
            _, adapted = self.forward_pass(forward, english, [])
            keep = self.reference.kl(english, adapted[english.attention_mask.to(adapted.device).bool()])
        total = ce + a.lambda_align * align + a.lambda_keep * keep
        return {"ce": ce, "align": align, "keep": keep, "total": total}

    def forward_pass(self, forward: Callable, batch: TokenBatch, layers: list[int], hidden: bool = True):
        """Pooled SAE codes at `layers` and the final (normed) hidden states (B, L, d) of one forward pass.

        Without `hidden` only the codes come back (None for the states), and the pass stops after the last layer.
        """
        device = self.lm.device
        keep = batch.keep.to(device)
        lengths = keep.sum(1)
        owner = torch.arange(len(lengths), device=device).repeat_interleave(lengths)
        pooled: dict[int, torch.Tensor] = {}

        def sink(layer: int, states: torch.Tensor) -> None:
            codes = self.saes.layers[layer].encode(states[keep].float())
            summed = codes.new_zeros((len(lengths), codes.shape[1])).index_add(0, owner, codes)
            pooled[layer] = summed / lengths.clamp(min=1).unsqueeze(1).to(codes.dtype)

        if not hidden:
            if layers:
                with ResidualCapture(self.lm, layers, sink) as cap:
                    cap.run(batch)
            return pooled, None
        inputs = {"input_ids": batch.input_ids.to(device), "attention_mask": batch.attention_mask.to(device)}
        with ResidualCapture(self.lm, layers, sink, grad=True) if layers else contextlib.nullcontext():
            # the LM head runs on one position only: callers apply it to the real tokens they need
            out = forward(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        return pooled, out.hidden_states[-1]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head (with the model's final soft-capping) on final hidden states."""
        model = self.lm.model
        logits = model.get_output_embeddings()(hidden)
        cap = getattr(model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def next_token_ce(self, hidden: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """Mean next-token cross-entropy over the positions whose next token is real."""
        predicts = batch.attention_mask[:, 1:].to(hidden.device).bool()
        labels = batch.input_ids[:, 1:].to(hidden.device)[predicts]
        return F.cross_entropy(self.logits(hidden[:, :-1][predicts]).float(), labels)


class EnglishReference:
    """What the frozen base model (adapter disabled) makes of each English sentence, kept per sentence id: its
    pooled SAE codes at the aligned layers, and what the KL term needs of its next-token distributions p.

    The full distributions (262k floats per token on Gemma) are too many to keep. When the LM head is linear
    (logits z = W h, no soft-capping: Gemma 3), p = softmax(W h_base) and
        KL(p || softmax(W h)) = logsumexp(W h) - logsumexp(W h_base) - (p W) . (h - h_base),
    so per token the mean embedding p W, h_base and one number suffice (written around h_base, the terms stay
    small and float32 rounding of p W does not surface); the adapted side then costs what a cross-entropy costs.
    The summary costs two LM-head products once per sentence, the base logits one per use, so it is made when
    sentences are used at least `SUMMARY_USES` times. Otherwise (and for Gemma 2's soft-capped logits) the base
    model's final hidden states are kept and its logits recomputed each step.

    `fill` computes the entries for whole id lists in length-sorted batches before training, so a value depends
    on its sentence's batch alone and a resumed run sees exactly the values of an uninterrupted one; `get` and
    `kl` compute what is missing from the batch at hand. Codes are kept sparse when most entries are zero.
    """

    def __init__(self, objective: Objective, layers: list[int], keep: bool, summarise: bool = True):
        self.objective, self.layers, self.keep = objective, layers, keep
        model = objective.lm.model
        head = model.get_output_embeddings()
        self.linear = (summarise and type(head) is torch.nn.Linear and head.bias is None and head.weight.dim() == 2
                       and not getattr(model.config, "final_logit_softcapping", None))
        self.codes: dict[str, torch.Tensor] = {}
        self.base: dict[str, tuple[torch.Tensor, ...]] = {}  # (mean embedding, states, base lse) or (states,)

    def __len__(self) -> int:
        return len(self.codes) if self.layers else len(self.base)

    @property
    def nbytes(self) -> int:
        def size(t: torch.Tensor) -> int:
            return t._values().nbytes + t._indices().nbytes if t.is_sparse else t.nbytes

        return sum(map(size, [*self.codes.values(), *(t for ts in self.base.values() for t in ts)]))

    def clear(self) -> None:
        self.codes.clear()
        self.base.clear()

    def cached(self, sid: str) -> bool:
        return (not self.layers or sid in self.codes) and (not self.keep or sid in self.base)

    def fill(self, batches: Iterable[TokenBatch]) -> None:
        for batch in batches:
            self._compute(batch)

    def get(self, batch: TokenBatch) -> dict[int, torch.Tensor]:
        """Pooled codes per aligned layer, (B, d_sae)."""
        self._complete(batch)
        if not self.layers:
            return {}
        stacked = torch.stack([self.codes[s].to_dense() for s in batch.sentence_ids]).to(self.objective.lm.device)
        return {layer: stacked[:, k] for k, layer in enumerate(self.layers)}

    def kl(self, batch: TokenBatch, hidden: torch.Tensor) -> torch.Tensor:
        """KL(base || adapted) per real token of `batch`, averaged; `hidden` holds the adapted model's final
        states at those tokens, row by row (N, d)."""
        self._complete(batch)
        objective, device = self.objective, hidden.device
        parts = [torch.cat(t) for t in zip(*(self.base[s] for s in batch.sentence_ids), strict=True)]
        if not self.linear:
            with torch.no_grad(), objective.lm.model.disable_adapter():
                base = objective.logits(parts[0].to(device))
            return _kl(base, objective.logits(hidden))
        wide = torch.float64 if device.type in ("cpu", "cuda") else torch.float32  # the terms nearly cancel
        mean, states, base_lse = (t.to(device=device, dtype=wide) for t in parts)
        lse = torch.logsumexp(objective.logits(hidden).float(), dim=-1)
        per_token = lse.to(wide) - base_lse - (mean * (hidden.to(wide) - states)).sum(-1)
        return (per_token.sum() / max(len(hidden), 1)).float()

    def _complete(self, batch: TokenBatch) -> None:
        missing = [row for row, sid in enumerate(batch.sentence_ids) if not self.cached(sid)]
        if missing:
            self._compute(_rows(batch, missing))

    def _compute(self, batch: TokenBatch) -> None:
        objective = self.objective
        model = objective.lm.model
        with torch.no_grad(), model.disable_adapter():
            pooled, hidden = objective.forward_pass(model, batch, self.layers, hidden=self.keep)
            if self.keep:  # per real token, row by row
                states = hidden[batch.attention_mask.to(hidden.device).bool()]
                base = self._distribution(states) if self.linear else (states.cpu(),)
                lengths = batch.attention_mask.sum(1).tolist()
                for sid, *parts in zip(batch.sentence_ids, *(t.split(lengths) for t in base), strict=True):
                    self.base[sid] = tuple(t.clone() for t in parts)  # a view would keep the whole batch alive
            for row, sid in enumerate(batch.sentence_ids):
                if self.layers:
                    codes = torch.stack([pooled[layer][row] for layer in self.layers]).cpu()
                    sparse = codes.to_sparse()
                    self.codes[sid] = sparse if sparse._nnz() * 3 < codes.numel() else codes

    def _distribution(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean embedding p W (N, d), the base final states (N, d) and logsumexp of the base logits (N,)."""
        weight = self.objective.lm.model.get_output_embeddings().weight.float()
        rows = max(1, HEAD_CHUNK // weight.shape[0])  # enough rows that reading W is not the bottleneck
        means, lse = [], []
        for lo in range(0, len(states), rows):
            logits = self.objective.logits(states[lo:lo + rows]).float()
            lse.append(torch.logsumexp(logits, dim=-1))
            means.append(torch.softmax(logits, dim=-1) @ weight)
        return torch.cat(means).cpu(), states.float().cpu(), torch.cat(lse).cpu()


def _rows(batch: TokenBatch, rows: list[int]) -> TokenBatch:
    """The given rows of a right-padded batch, trimmed to their longest sentence."""
    width = int(batch.attention_mask[rows].sum(1).max())
    return TokenBatch([batch.sentence_ids[r] for r in rows], batch.input_ids[rows, :width],
                      batch.attention_mask[rows, :width])


def _kl(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(base || adapted) per position (each predicts the next token), averaged; rows are real positions."""
    return _ChunkedKL.apply(base_logits, logits) / max(len(logits), 1)


class _ChunkedKL(torch.autograd.Function):
    """sum over rows of KL(softmax(base) || softmax(logits)), a few rows at a time.

    The gradient with respect to the logits, softmax(logits) - softmax(base), is formed in the forward pass
    chunk by chunk, so a (rows, vocab) tensor is written once instead of the half dozen full-size
    intermediates (and their backward) of log_softmax twice plus kl_div; on a CPU that halves the term's time.
    """

    @staticmethod
    def forward(ctx, base: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        need = ctx.needs_input_grad[1]
        grad = torch.empty(logits.shape, dtype=torch.float32, device=logits.device) if need else None
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        rows = max(1, (KL_CHUNK_CPU if logits.device.type == "cpu" else KL_CHUNK) // max(logits.shape[-1], 1))
        for lo in range(0, len(logits), rows):
            log_p = F.log_softmax(base[lo:lo + rows].float(), dim=-1)
            log_q = F.log_softmax(logits[lo:lo + rows].float(), dim=-1)
            p = log_p.exp()
            total += (p * (log_p - log_q)).sum()
            if need:
                torch.sub(log_q.exp_(), p, out=grad[lo:lo + rows])
        ctx.save_for_backward(grad)
        ctx.dtype = logits.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return None, (grad * grad_output).to(ctx.dtype)


def _distance(pooled: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "cosine":
        return (1 - F.cosine_similarity(pooled, target, dim=1, eps=1e-8)).mean()
    return ((pooled - target) ** 2).sum() / (target**2).sum().clamp(min=1e-8)


# ---------------------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average a dict of floats over ranks (identity on one process)."""
        if self.world == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist(), strict=True)}


def resolve_engine(name: str) -> str:
    if name == "auto":
        return "deepspeed" if torch.cuda.is_available() else "torch"
    return name


def _slurm_env() -> None:
    """Under `srun` with one task per GPU, derive torch.distributed's variables from Slurm's."""
    env = os.environ
    if "RANK" in env or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in env:
        out = subprocess.run(["scontrol", "show", "hostnames", env.get("SLURM_JOB_NODELIST", "")],
                             capture_output=True, text=True)
        env["MASTER_ADDR"] = (out.stdout.split() or ["127.0.0.1"])[0]
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(engine: str, device: str = "auto") -> Dist:
    """Join the launcher's process group (torchrun, deepspeed, srun) or make a one-process one.

    DeepSpeed always needs a process group; on CPU it gets gloo and its shared-memory allreduce op,
    which it would JIT-compile for minutes on first use, is switched off (gloo does that job here).
    Call before loading the model: on CUDA it selects this rank's GPU.
    """
    _slurm_env()
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    dist = Dist(int(env.get("RANK", "0")), world, int(env.get("LOCAL_RANK", "0")))
    cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if cuda:
        torch.cuda.set_device(dist.local_rank)
    if engine == "deepspeed":
        if not cuda:
            env.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        import deepspeed.ops

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if not cuda:
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # cached dict build_shm_op consults
        if world == 1 and not torch.distributed.is_initialized():
            env.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
            env.setdefault("MASTER_ADDR", "127.0.0.1")
            env.setdefault("MASTER_PORT", str(_free_port()))
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False, verbose=False)
    elif world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return dist


# -------------------------------------------------------------------------------------------- engines


def _warmup(steps: int) -> Callable[[int], float]:
    warm = max(1, min(WARMUP_STEPS, steps // 10))
    return functools.partial(_warmup_factor, warm=warm)


def _warmup_factor(step: int, warm: int) -> float:
    return min(1.0, (step + 1) / warm)


class TorchEngine:
    """Plain AdamW loop; averages gradients over ranks itself when launched with several processes."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, a: AlignConfig, n_micro: int, dist: Dist):
        self.model, self.dist, self.n_micro = model, dist, n_micro
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=a.lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _warmup(a.steps))
        self._micro = 0

    def forward(self, **inputs):
        return self.model(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.n_micro).backward()

    def micro_step(self) -> None:
        self._micro += 1
        if self._micro % self.n_micro:
            return
        if self.dist.world > 1:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.dist.world
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def save(self, folder: Path) -> None:
        if self.dist.main:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       folder / "optimizer.pt")

    def load(self, folder: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.model, load_file(str(folder / "adapter" / "adapter_model.safetensors")))
        state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        yield


class DeepSpeedEngine:
    """deepspeed.initialize with a torch AdamW (no CPUAdam build), ZeRO, bf16 on GPUs, grad accumulation.

    ZeRO stages above 1 only partition gradients, which buys nothing on CPU, so CPU runs use at most 1.
    """

    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, a: AlignConfig, n_micro: int, dist: Dist, lm: LoadedModel):
        import deepspeed

        self.model, self.dist = model, dist
        self.stage = a.zero_stage if lm.device.type == "cuda" else min(a.zero_stage, 1)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup(a.steps))
        self.config = {
            "train_micro_batch_size_per_gpu": a.batch_size,
            "gradient_accumulation_steps": n_micro,
            "gradient_clipping": MAX_GRAD_NORM,
            "zero_optimization": {"stage": self.stage},
            "bf16": {"enabled": lm.dtype == torch.bfloat16},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config)

    def forward(self, **inputs):
        return self.engine(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself

    def micro_step(self) -> None:
        self.engine.step()  # steps the optimizer and scheduler only at accumulation boundaries

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def save(self, folder: Path) -> None:
        # every rank writes its optimizer partition; frozen base weights are not repeated
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state", save_latest=False,
                                    exclude_frozen_parameters=True)

    def load(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder / "deepspeed"), tag="state", load_module_strict=False)
        if path is None:
            raise UserError(f"{folder}: DeepSpeed could not load its checkpoint; delete the folder to start afresh")

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Full LoRA tensors on every rank: a no-op below ZeRO-3, which alone partitions parameters."""
        if self.stage < 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for p in self.model.parameters() if p.requires_grad]):
            yield


def make_engine(name: str, model: torch.nn.Module, a: AlignConfig, n_micro: int, dist: Dist, lm: LoadedModel):
    if name == "deepspeed":
        return DeepSpeedEngine(model, a, n_micro, dist, lm)
    return TorchEngine(model, a, n_micro, dist)


def reference_uses(a: AlignConfig, n_train: int, n_targets: int = 1, world: int = 1) -> float:
    """How many times training uses each English training sentence, on average (its targets share them)."""
    return a.steps * a.grad_accum * a.batch_size * world * n_targets / max(n_train, 1)


def optimizer_step(objective: Objective, eng, micro: list[tuple[TokenBatch, TokenBatch, str]]) -> dict[str, float]:
    """One optimizer step of training: the objective, backward and micro-step on each (target batch, English
    batch, language) micro-batch; the engine steps once it has seen all of them. Returns the terms averaged."""
    sums = dict.fromkeys(TERMS, 0.0)
    for target, english, lang in micro:
        losses = objective(eng.forward, target, english, lang)
        eng.backward(losses["total"])
        eng.micro_step()
        for k in TERMS:
            sums[k] += losses[k].item() / len(micro)
    return sums


# ---------------------------------------------------------------------------------------- checkpoints


def checkpoints(folder: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary folders start with a dot and are ignored)."""
    return sorted(p for p in (folder / "checkpoints").glob("step-*") if (p / "state.json").is_file())


def latest_state(folder: Path) -> dict | None:
    found = checkpoints(folder)
    return json.loads((found[-1] / "state.json").read_text()) if found else None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_json(path: Path, data: dict) -> None:
    """Atomic JSON write (non-finite floats become null)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_finite(data), indent=1))
    os.replace(tmp, path)


def _finite(obj):
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (np.generic, torch.Tensor)):
        obj = obj.item()
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def save_adapter(model: torch.nn.Module, engine, dist: Dist, target: Path, trained: bool = True
                 ) -> dict[str, torch.Tensor]:
    """Save the peft adapter atomically (rank 0) from gathered parameters and check it reads back equal.

    Returns the saved tensors. Raises if the file differs from the trained weights, or if `trained`
    and every lora_B is still zero (LoRA starts with B = 0, so that is an adapter that learnt nothing).
    """
    from safetensors.torch import load_file

    with engine.gathered():
        state = trainable_state(model)
        if dist.main:
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(str(tmp))
            saved = load_file(str(tmp / "adapter_model.safetensors"))
            bad = sorted(set(state) ^ set(saved)) or [k for k in state if not torch.equal(state[k], saved[k].cpu())]
            if bad:
                raise RuntimeError(f"the adapter saved in {tmp} differs from the trained weights ({bad[:3]})")
            if trained and not any(bool(v.any()) for k, v in saved.items() if "lora_B" in k):
                raise RuntimeError(f"the adapter saved in {tmp} is empty (every lora_B is zero) after training")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
    dist.barrier()
    return state


# ------------------------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    model: torch.nn.Module  # the peft model, adapter enabled
    adapter: Path
    metrics: dict
    state: dict[str, torch.Tensor] = field(repr=False)
    resumed_from: int | None = None


def fingerprint(cfg: Config, lm: LoadedModel, saes: SAESet, targets: list[str], split: Split, engine: str,
                world: int) -> str:
    """What a checkpoint must share with this run to be resumed: everything but the step count, the
    checkpoint cadence and the unit selection (targets are passed explicitly, the engine resolved)."""
    a = {k: v for k, v in cfg.to_dict()["align"].items()
         if k not in ("steps", "checkpoint_every", "targets", "joint", "engine")}
    spec = [a, lm.model_id, lm.revision, str(lm.dtype), saes.ids, targets, split.to_dict(), engine, world,
            cfg.run.seed, cfg.extract.max_length]
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train(cfg: Config, lm: LoadedModel, saes: SAESet, corpus: Corpus, targets: list[str], split: Split,
          weights: dict[str, dict[int, float]], folder: Path, dist: Dist | None = None, engine: str | None = None,
          console: Console | None = None, info: dict | None = None) -> TrainResult:
    """Train one LoRA adapter for `targets` (one language, or several for a joint adapter) into `folder`.

    Resumes from the latest checkpoint in `folder/checkpoints` when its fingerprint matches; its
    layer weights win over `weights`, so a resumed run optimises the objective it started with.
    `lm.model` must be the base model; it is returned wrapped (`TrainResult.model`).
    """
    a = cfg.align
    dist = dist or Dist()
    console = console if dist.main and console is not None else Console(quiet=True)
    engine_name = resolve_engine(engine or a.engine)
    folder.mkdir(parents=True, exist_ok=True)
    print_ = fingerprint(cfg, lm, saes, targets, split, engine_name, dist.world)
    state = latest_state(folder)
    if state and state["fingerprint"] != print_:
        raise UserError(
            f"{folder / 'checkpoints'} holds checkpoints of a different configuration (align settings, model, SAEs, "
            "split, engine or number of processes changed); delete that folder to start afresh or use another --run"
        )
    if state and state["step"] > a.steps:
        raise UserError(f"{folder}: the latest checkpoint is at step {state['step']}, beyond align.steps={a.steps}; "
                        "raise --steps or delete the checkpoints to retrain")
    if state:
        weights = {lang: {int(k): v for k, v in w.items()} for lang, w in state["weights"].items()}
        info = info or state.get("info")
    torch.manual_seed(cfg.run.seed)  # identical LoRA initialisation on every rank and every run
    base = lm.model
    model = attach_lora(base, a, lm.n_layers)
    peft_lm = LoadedModel(model, lm.tokenizer, lm.model_id, lm.revision, lm.device, lm.dtype)
    n_micro = a.grad_accum * len(targets)
    n_lora, n_all = (sum(p.numel() for p in model.parameters() if p.requires_grad or every) for every in (False, True))
    console.print(f"LoRA: {n_lora:,} trainable parameters ({100 * n_lora / n_all:.2f} % of the model), "
                  f"engine {engine_name}")
    eng = make_engine(engine_name, model, a, n_micro, dist, lm)
    uses = reference_uses(a, len(split.train), len(targets), dist.world)
    objective = Objective(peft_lm, saes, weights, a, summarise=uses >= SUMMARY_USES)
    history: dict[str, list] = {"steps": [], "validation": []}
    start = 0
    if state:
        latest = checkpoints(folder)[-1]
        eng.load(latest)
        rng = latest / f"rng-{dist.rank}.pt"
        _set_rng_state(torch.load(rng if rng.is_file() else latest / "rng-0.pt", weights_only=False))
        history, start = state["history"], state["step"]
        console.print(f"[bold]{'+'.join(targets)}:[/] resuming from step {start} ({latest})")
    metrics = {
        "targets": targets, "engine": engine_name, "world_size": dist.world, "fingerprint": print_,
        "config": cfg.to_dict()["align"], "weights": weights, "split": split.to_dict(), **(info or {}),
        "resumed_from": (state or {}).get("resumed_from", []) + ([start] if state else []),
    }
    texts = {lang: dict(corpus.sentences(lang)) for lang in [*targets, REFERENCE]}
    began = time.perf_counter()
    english = [(sid, texts[REFERENCE][sid]) for sid in dict.fromkeys(split.train + split.val)]
    objective.reference.fill(iter_batches(english, lm.tokenizer, cfg.extract.batch_tokens, cfg.extract.max_length))
    console.print(f"English reference from the base model: {len(objective.reference)} sentences, "
                  f"{objective.reference.nbytes / 2**20:.0f} MiB, {time.perf_counter() - began:.1f} s "
                  f"(KL base {'summarised' if objective.reference.linear else 'recomputed each step'}, "
                  f"{uses:.1f} uses per sentence)")

    def batch(lang: str, ids: list[str]) -> tuple[TokenBatch, TokenBatch]:
        return (collate(lm.tokenizer, [(s, texts[lang][s]) for s in ids], cfg.extract.max_length),
                collate(lm.tokenizer, [(s, texts[REFERENCE][s]) for s in ids], cfg.extract.max_length))

    def validate(step: int) -> dict:
        sums, n = dict.fromkeys(TERMS, 0.0), 0
        eng.train(False)
        with torch.no_grad():
            for lang in targets:
                chunks = [split.val[i:i + a.batch_size] for i in range(0, len(split.val), a.batch_size)]
                for ids in chunks[dist.rank::dist.world]:
                    losses = objective(model, *batch(lang, ids), lang)
                    for k in TERMS:
                        sums[k] += losses[k].item() * len(ids)
                    n += len(ids)
        eng.train(True)
        totals = dist.mean({**sums, "n": float(n)})
        return {"step": step, **{k: totals[k] / totals["n"] for k in TERMS}} if totals["n"] else {"step": step}

    def checkpoint(step: int) -> None:
        root = folder / "checkpoints"
        final, tmp = root / f"step-{step:06d}", root / f".step-{step:06d}.tmp"
        if dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        eng.save(tmp)
        torch.save(_rng_state(), tmp / f"rng-{dist.rank}.pt")
        if dist.main:
            with eng.gathered():
                model.save_pretrained(str(tmp / "adapter"))
            write_json(tmp / "state.json", {"step": step, "fingerprint": print_, "weights": weights, "info": info,
                                            "history": history, "resumed_from": metrics["resumed_from"]})
        dist.barrier()
        if dist.main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in checkpoints(folder)[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)
            write_json(folder / "metrics.json", {**metrics, **history, "step": step, "complete": False})
        dist.barrier()

    eng.train(True)
    log_every = max(1, min(a.checkpoint_every, a.steps // 20))
    with _progress(console) as progress:
        task = progress.add_task("+".join(targets), total=a.steps, completed=start, **_fields(None))
        for step in range(start, a.steps):
            began, cpu = time.perf_counter(), time.process_time()
            micro = [(*batch(lang, batch_ids(split.train, (step * a.grad_accum + m) * dist.world + dist.rank,
                                             a.batch_size, cfg.run.seed, lang)), lang)
                     for m in range(a.grad_accum) for lang in targets]
            sums = optimizer_step(objective, eng, micro)
            record = {"step": step + 1, **dist.mean(sums), "lr": eng.lr, "seconds": time.perf_counter() - began,
                      "cpu_seconds": time.process_time() - cpu}
            if not all(math.isfinite(record[k]) for k in TERMS):
                raise RuntimeError(f"align: non-finite loss at step {step + 1}: {record}; lower --lr")
            history["steps"].append(record)
            progress.update(task, advance=1, **_fields(record))
            if not console.is_terminal and (step + 1) % log_every == 0:  # batch logs get no live progress bar
                console.print(f"align {'+'.join(targets)} step {step + 1}/{a.steps}: " + "  ".join(
                    f"{k} {record[k]:.4f}" for k in TERMS) + f"  ({record['seconds']:.1f} s)", highlight=False,
                    soft_wrap=True)
            if (step + 1) % a.checkpoint_every == 0 or step + 1 == a.steps:
                if split.val:
                    history["validation"].append(validate(step + 1))
                checkpoint(step + 1)
    adapter = folder / "adapter"
    saved = save_adapter(model, eng, dist, adapter)
    digest = state_digest(saved)
    digests = [digest] * dist.world
    if dist.world > 1:
        torch.distributed.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        raise RuntimeError(f"align: ranks hold different adapter weights after training ({digests})")
    last = history["steps"][-1] if history["steps"] else {}
    metrics.update(history, step=a.steps, complete=True, adapter=str(adapter), adapter_sha256=adapter_sha(adapter),
                   rank_digests=digests, final={k: last.get(k) for k in TERMS},
                   final_validation=history["validation"][-1] if history["validation"] else None)
    if dist.main:
        write_json(folder / "metrics.json", metrics)
    return TrainResult(model, adapter, metrics, saved, start if state else None)


def adapter_sha(adapter: Path) -> str:
    h = hashlib.sha256()
    with open(adapter / "adapter_model.safetensors", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]align {task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
        TextColumn("ce {task.fields[ce]:.3f}  align {task.fields[align]:.3f}  keep {task.fields[keep]:.4f}  "
                   "total {task.fields[loss]:.3f}"),
        TimeRemainingColumn(), console=console, transient=False,
    )


def _fields(record: dict | None) -> dict[str, float]:
    """Progress fields (rich reserves `total`, so the total loss shows as `loss`)."""
    values = {k: (record or {}).get(k, math.nan) for k in TERMS}
    values["loss"] = values.pop("total")
    return values
