"""The training loop as a class: `Trainer(...).fit()` trains (or resumes) one LoRA adapter into a folder.

Training is deterministic for a given seed: batches are a pure function of the step (seeded epoch
permutations), and checkpoints hold adapter, optimizer, scheduler, step, loss history and every rank's
RNG states, written to a staging folder and renamed, so a killed run resumes exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from toolkit import files
from toolkit.align import checkpoints as ckpt
from toolkit.align.adapter import adapter_sha, attach_lora, save_adapter, state_digest
from toolkit.align.data import batch_ids, collate
from toolkit.align.distributed import resolve_engine
from toolkit.align.engines import make_engine, optimizer_step
from toolkit.align.inputs import AlignInputs, AlignUnit
from toolkit.align.objective import SUMMARY_USES, TERMS, Objective, reference_uses
from toolkit.capture import TokenBatch, iter_batches
from toolkit.errors import UserError
from toolkit.languages import REFERENCE
from toolkit.rundir import AlignFolder

log = logging.getLogger(__name__)


class TrainingProgress(Protocol):
    """What the trainer reports: notes, and the step records of a run of `total` steps."""

    def note(self, text: str, label: str | None = None) -> None: ...
    def start(self, name: str, total: int, completed: int, log_every: int) -> None: ...
    def update(self, record: dict) -> None: ...
    def stop(self) -> None: ...


class LogProgress:
    """The default report: notes and every `log_every`-th step to the `logging` module."""

    def note(self, text: str, label: str | None = None) -> None:
        log.info("%s%s", f"{label}: " if label else "", text)

    def start(self, name: str, total: int, completed: int, log_every: int) -> None:
        self.name, self.total, self.log_every = name, total, log_every

    def update(self, record: dict) -> None:
        if record["step"] % self.log_every == 0:
            log.info("align %s step %d/%d: %s", self.name, record["step"], self.total,
                     "  ".join(f"{k} {record[k]:.4f}" for k in TERMS) + grad_text(record))

    def stop(self) -> None:
        pass


def grad_text(record: dict) -> str:
    """The per-term gradient norms of a step record, when it has them."""
    norms = [f"|g_{k}| {record[f'grad_{k}']:.3g}" for k in ("ce", "align", "keep") if f"grad_{k}" in record]
    return ("  " + "  ".join(norms)) if norms else ""


class _Silent(LogProgress):
    def note(self, text: str, label: str | None = None) -> None:
        pass

    def update(self, record: dict) -> None:
        pass


@dataclass
class TrainResult:
    model: torch.nn.Module  # the peft model, adapter enabled
    adapter: Path
    metrics: dict
    state: dict[str, torch.Tensor] = field(repr=False)
    resumed_from: int | None = None


def engine_of(unit: AlignUnit, inputs: AlignInputs) -> str:
    """The engine a unit trains with: the job's resolved one, else the unit's `align.engine` resolved."""
    return resolve_engine(inputs.engine or unit.align.engine)


def fingerprint(unit: AlignUnit, inputs: AlignInputs) -> str:
    """What a checkpoint must share with this run to be resumed: everything but the step count, the
    checkpoint cadence, the unit selection (targets are passed explicitly, the engine resolved) and the grid file
    a sweep point came from (its values are the align settings themselves)."""
    a = {k: v for k, v in dataclasses.asdict(unit.align).items()
         if k not in ("steps", "checkpoint_every", "targets", "joint", "engine", "sweep")}
    lm = inputs.lm
    spec = [a, lm.model_id, lm.revision, str(lm.dtype), inputs.saes.ids, unit.targets, unit.split.to_dict(),
            engine_of(unit, inputs), inputs.dist.world, unit.seed, inputs.max_length]
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Trainer:
    """Train one LoRA adapter for `unit.targets` (one language, or several for a joint adapter) into `folder`.

    Resumes from the latest checkpoint in `folder/checkpoints` when its fingerprint matches; its layer
    weights win over `weights`, so a resumed run optimises the objective it started with. `inputs.lm.model`
    must be the base model; `fit` returns it wrapped (`TrainResult.model`).
    """

    def __init__(self, unit: AlignUnit, inputs: AlignInputs, weights: dict[str, dict[int, float]], folder: AlignFolder,
                 progress: TrainingProgress | None = None, info: dict | None = None):
        self.unit, self.a, self.inputs = unit, unit.align, inputs
        self.lm, self.saes, self.corpus, self.dist = inputs.lm, inputs.saes, inputs.corpus, inputs.dist
        self.targets, self.split, self.folder = unit.targets, unit.split, folder
        self.progress = (progress or LogProgress()) if self.dist.main else _Silent()
        self.engine_name = engine_of(unit, inputs)
        self.fingerprint = fingerprint(unit, inputs)
        self.state = self._resumable_state()
        self.weights = weights if not self.state else {
            lang: {int(k): v for k, v in w.items()} for lang, w in self.state["weights"].items()}
        self.info = (info or self.state.get("info")) if self.state else info
        self.history: dict[str, list] = {"steps": [], "validation": []}
        self.start = 0

    def _resumable_state(self) -> dict | None:
        self.folder.root.mkdir(parents=True, exist_ok=True)
        state = ckpt.latest_state(self.folder.checkpoints)
        if state and state.get("fingerprint") != self.fingerprint:
            raise UserError(
                f"{self.folder.checkpoints} holds checkpoints of a different configuration (align settings, "
                "model, SAEs, split, engine or number of processes changed); delete that folder to start afresh or "
                "use another --run")
        if state and state["step"] > self.a.steps:
            raise UserError(f"{self.folder.root}: the latest checkpoint is at step {state['step']}, beyond align.steps="
                            f"{self.a.steps}; raise --steps or delete the checkpoints to retrain")
        return state

    # ------------------------------------------------------------------------------------------ setup

    def _setup(self) -> None:
        """LoRA (same initialisation on every rank and run), engine, objective, resumed state, English reference."""
        a, lm = self.a, self.lm
        torch.manual_seed(self.unit.seed)
        self.model = attach_lora(lm.model, a, lm.n_layers)
        peft_lm = dataclasses.replace(lm, model=self.model)
        n_lora, n_all = (sum(p.numel() for p in self.model.parameters() if p.requires_grad or every)
                         for every in (False, True))
        self.progress.note(f"LoRA: {n_lora:,} trainable parameters ({100 * n_lora / n_all:.2f} % of the model), "
                           f"engine {self.engine_name}")
        self.engine = make_engine(self.engine_name, self.model, a, a.grad_accum * len(self.targets), self.dist, lm)
        uses = reference_uses(a, len(self.split.train), len(self.targets), self.dist.world)
        self.objective = Objective(peft_lm, self.saes, self.weights, a, summarise=uses >= SUMMARY_USES)
        if self.state:
            self.resume()
        self.metrics = {
            "targets": self.targets, "engine": self.engine_name, "world_size": self.dist.world,
            "fingerprint": self.fingerprint, "config": dataclasses.asdict(a), "weights": self.weights,
            "split": self.split.to_dict(), **(self.info or {}),
            "resumed_from": (self.state or {}).get("resumed_from", []) + ([self.start] if self.state else []),
        }
        self.texts = {lang: dict(self.corpus.sentences(lang)) for lang in [*self.targets, REFERENCE]}
        self._fill_reference(uses)

    def resume(self) -> None:
        """Engine, adapter and RNG state of the latest checkpoint; every file read without unpickling code."""
        latest = ckpt.saved_checkpoints(self.folder.checkpoints)[-1]
        self.engine.load(latest)
        ckpt.load_rng(latest, self.dist.rank)
        self.history, self.start = self.state["history"], self.state["step"]
        self.progress.note(f"resuming from step {self.start} ({latest})", label="+".join(self.targets))

    def _fill_reference(self, uses: float) -> None:
        began, inputs = time.perf_counter(), self.inputs
        english = [(sid, self.texts[REFERENCE][sid]) for sid in self._read_ids()]
        reference = self.objective.reference
        reference.fill(iter_batches(english, self.lm.tokenizer, inputs.batch_tokens, inputs.max_length))
        self.progress.note(f"English reference from the base model: {len(reference)} sentences, "
                           f"{reference.nbytes / 2**20:.0f} MiB, {time.perf_counter() - began:.1f} s "
                           f"(KL base {'summarised' if reference.linear else 'recomputed each step'}, "
                           f"{uses:.1f} uses per sentence)")

    def _read_ids(self) -> list[str]:
        """The training and validation ids this rank's steps will read, in split order: every step's batches
        from step 0 (a resumed run fills the same sentences in the same batches) and the validation ids. A short
        run reads a fraction of the training ids, and the English reference is most of its setup time."""
        drawn = {sid for step in range(self.a.steps) for _, ids in self._step_ids(step) for sid in ids}
        drawn.update(self.split.val)
        return [sid for sid in dict.fromkeys(self.split.train + self.split.val) if sid in drawn]

    # --------------------------------------------------------------------------------------- training

    def fit(self) -> TrainResult:
        """Train from the start or the resumed step to `align.steps`, checkpointing, then save the adapter."""
        began = time.perf_counter()
        self._setup()
        self.setup_seconds = time.perf_counter() - began
        a = self.a
        self.engine.train(True)
        self.progress.start("+".join(self.targets), a.steps, self.start, max(1, min(a.checkpoint_every, a.steps // 20)))
        try:
            for step in range(self.start, a.steps):
                record = self.train_step(step)
                self.history["steps"].append(record)
                self.progress.update(record)
                if (step + 1) % a.checkpoint_every == 0 or step + 1 == a.steps:
                    if self.split.val:
                        self.history["validation"].append(self.validate(step + 1))
                    self.save_checkpoint(step + 1)
        finally:
            self.progress.stop()
        return self._finish()

    def batch(self, lang: str, ids: list[str]) -> tuple[TokenBatch, TokenBatch]:
        """The target-language batch and its English parallel."""
        n = self.inputs.max_length
        return (collate(self.lm.tokenizer, [(s, self.texts[lang][s]) for s in ids], n),
                collate(self.lm.tokenizer, [(s, self.texts[REFERENCE][s]) for s in ids], n))

    def _step_ids(self, step: int) -> list[tuple[str, list[str]]]:
        """Each micro-batch of optimizer step `step` on this rank: its language and training ids."""
        a, dist = self.a, self.dist
        return [(lang, batch_ids(self.split.train, (step * a.grad_accum + m) * dist.world + dist.rank, a.batch_size,
                                 self.unit.seed, lang))
                for m in range(a.grad_accum) for lang in self.targets]

    def train_step(self, step: int) -> dict:
        """Optimizer step `step` (0-based): its micro-batches are a pure function of the step and the rank."""
        a, dist = self.a, self.dist
        began, cpu = time.perf_counter(), time.process_time()
        micro = [(*self.batch(lang, ids), lang) for lang, ids in self._step_ids(step)]
        # per-term gradient norms cost three more backward passes: on the first step and at each checkpoint
        norms = step == 0 or (step + 1) % a.checkpoint_every == 0
        sums = optimizer_step(self.objective, self.engine, micro, grad_norms=norms)
        record = {"step": step + 1, **dist.mean(sums), "lr": self.engine.lr, "seconds": time.perf_counter() - began,
                  "cpu_seconds": time.process_time() - cpu}
        if not all(math.isfinite(record[k]) for k in TERMS):
            raise RuntimeError(f"align: non-finite loss at step {step + 1}: {record}; lower --lr")
        return record

    def validate(self, step: int) -> dict:
        """The loss terms on the validation ids, averaged per sentence over all ranks."""
        a, dist, val = self.a, self.dist, self.split.val
        sums, n = dict.fromkeys(TERMS, 0.0), 0
        self.engine.train(False)
        with torch.no_grad():
            for lang in self.targets:
                chunks = [val[i:i + a.batch_size] for i in range(0, len(val), a.batch_size)]
                for ids in chunks[dist.rank::dist.world]:
                    losses = self.objective(self.model, *self.batch(lang, ids), lang)
                    for k in TERMS:
                        sums[k] += losses[k].item() * len(ids)
                    n += len(ids)
        self.engine.train(True)
        totals = dist.mean({**sums, "n": float(n)})
        return {"step": step, **{k: totals[k] / totals["n"] for k in TERMS}} if totals["n"] else {"step": step}

    def save_checkpoint(self, step: int) -> None:
        """checkpoints/step-NNNNNN whole or not at all; the two newest are kept; metrics.json says how far."""
        dist = self.dist
        with ckpt.staged_checkpoint(ckpt.step_folder(self.folder.checkpoints, step), dist) as tmp:
            self.engine.save(tmp)
            ckpt.save_rng(tmp, dist.rank)
            if dist.main:
                with self.engine.gathered():
                    self.model.save_pretrained(str(tmp / "adapter"))
                files.write_json(tmp / "state.json", {
                    "step": step, "fingerprint": self.fingerprint, "weights": self.weights, "info": self.info,
                    "history": self.history, "resumed_from": self.metrics["resumed_from"]})
        if dist.main:
            ckpt.prune(self.folder.checkpoints)
            files.write_json(self.folder.metrics, {**self.metrics, **self.history, "step": step,
                                                          "complete": False})
        dist.barrier()

    def _finish(self) -> TrainResult:
        """Save the adapter, check every rank holds the same weights, write the final metrics.json."""
        dist, adapter = self.dist, self.folder.adapter
        saved = save_adapter(self.model, self.engine, dist, adapter)
        digests = [state_digest(saved)] * dist.world
        if dist.world > 1:
            torch.distributed.all_gather_object(digests, digests[0])
        if len(set(digests)) > 1:
            raise RuntimeError(f"align: ranks hold different adapter weights after training ({digests})")
        history = self.history
        last = history["steps"][-1] if history["steps"] else {}
        self.metrics.update(history, step=self.a.steps, complete=True, adapter=str(adapter),
                            adapter_sha256=adapter_sha(adapter), rank_digests=digests,
                            final={k: last.get(k) for k in TERMS},
                            train_seconds=self.setup_seconds + sum(r["seconds"] for r in history["steps"]),
                            final_validation=history["validation"][-1] if history["validation"] else None)
        if dist.main:
            files.write_json(self.folder.metrics, self.metrics)
        return TrainResult(self.model, adapter, self.metrics, saved, self.start if self.state else None)
