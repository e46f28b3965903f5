"""Activation-aware LoRA alignment, one module per noun: `data` (split, batches), `weights` (layer weights from
the gap), `objective` (loss, English reference, KL), `adapter` (LoRA), `distributed`, `engines` (torch,
DeepSpeed), `checkpoints` (safe save/load), `inputs` (what a job hands the library: `AlignInputs`, `AlignUnit`),
`trainer` (`Trainer.fit`), `metrics` (before/after numbers).

The objective for a target language T and the parallel English sentences (defaults; each weight in
`AlignConfig`):

    loss  = CE(T) + lambda_align * align + lambda_keep * keep
    align = (1/|L|) * sum over layers l in L of w_l * term(pool(f_l(h_l(T))), pool(g_l(h_l^base(en))))
    keep  = KL(p_base || p_adapted) per English token, averaged over real tokens

- h_l is the residual stream after decoder block l (the extraction hook point); pool is the mean over
  the sentence's tokens with BOS and padding excluded, the tokens extraction measures.
- The English side and the KL's base logits come from the base model (adapter disabled, no second
  copy) under no_grad: a fixed target, so the adapter cannot close the gap by moving English. Being
  fixed, they are computed once per sentence before training (`EnglishReference`), not in every step.
- term, f and g are `align.objective`'s (`objective.OBJECTIVES`, formulas in their docstrings): `match`
  (relative squared error of the codes), `cosine`, `masked`, `mass` (one-sided hinge on SAE mass, the
  default), `pre` (hinge on pre-activations), `resid` (hinge on the residual norm, the control) and
  `none` (no term). docs/alignment.md says why the default is what it is.
- w_l ("gap", default) = max(0, -gap_l) with gap_l T's measured mass gap to English in percent,
  scaled to mean 1 over the chosen layers (so "uniform" is all ones and lambda_align means the same
  for both); layers where T is not weaker get 0; if none is weaker, weights fall back to uniform.
- The SAEs are frozen; gradients flow through their encoders into the LoRA parameters only.

Cost: a step is the adapted target pass (with SAE encodes) and the adapted English pass, forward and
backward; logits are formed for real tokens only (`python -m benchmarks.align_step` compares a step
with a plain LoRA LM step).

Training is deterministic and resumable; see `toolkit.align.trainer`.
"""

from toolkit.align.adapter import adapter_sha, attach_lora, save_adapter, state_digest, trainable_state
from toolkit.align.checkpoints import (
    KEEP_CHECKPOINTS,
    latest_state,
    load_tensors,
    read_json,
    saved_checkpoints,
)
from toolkit.align.data import Split, batch_ids, collate, ids_hash, split_ids
from toolkit.align.distributed import Dist, resolve_engine, setup_distributed
from toolkit.align.engines import DeepSpeedEngine, TorchEngine, make_engine, optimizer_step
from toolkit.align.inputs import AlignInputs, AlignUnit
from toolkit.align.objective import (
    OBJECTIVES,
    SUMMARY_USES,
    TERMS,
    EnglishReference,
    Objective,
    make_term,
    reference_uses,
    surrogate_codes,
)
from toolkit.align.trainer import LogProgress, Trainer, TrainingProgress, TrainResult, engine_of, fingerprint
from toolkit.align.weights import GAP_SENTENCES, layer_gaps, mean_mass, weights_from_gaps

__all__ = [
    "GAP_SENTENCES", "KEEP_CHECKPOINTS", "OBJECTIVES", "SUMMARY_USES", "TERMS", "AlignInputs", "AlignUnit",
    "DeepSpeedEngine", "Dist",
    "EnglishReference", "LogProgress", "Objective", "Split", "TorchEngine", "TrainResult", "Trainer",
    "TrainingProgress", "adapter_sha", "attach_lora", "batch_ids", "collate", "engine_of", "fingerprint",
    "ids_hash", "latest_state", "layer_gaps", "load_tensors", "make_engine", "make_term", "mean_mass",
    "optimizer_step", "read_json", "reference_uses", "resolve_engine", "save_adapter",
    "saved_checkpoints", "setup_distributed", "split_ids", "state_digest", "surrogate_codes", "trainable_state",
    "weights_from_gaps",
]
