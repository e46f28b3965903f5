"""The alignment objective for one batch of parallel sentences (see the package docstring), the base model's
English reference it compares against, and the chunked KL."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from toolkit.capture import ResidualCapture, TokenBatch
from toolkit.config import AlignConfig
from toolkit.models import LoadedModel
from toolkit.saes import SAESet

TERMS = ("ce", "align", "keep", "total")
KL_CHUNK_CPU = 1 << 20  # logits per chunk of the KL term: 4 MiB of fp32 stays in a CPU's cache
KL_CHUNK = 1 << 28  # on accelerators, few large kernels
SUMMARY_USES = 2.0  # the KL's base summary costs about two uses' worth of base logits (measured on CPU)
HEAD_CHUNK = 1 << 24  # logits per chunk where the LM head runs inside the chunk loop (64 rows of Gemma's 262k)


def reference_uses(a: AlignConfig, n_train: int, n_targets: int = 1, world: int = 1) -> float:
    """How many times training uses each English training sentence, on average (its targets share them)."""
    return a.steps * a.grad_accum * a.batch_size * world * n_targets / max(n_train, 1)


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

