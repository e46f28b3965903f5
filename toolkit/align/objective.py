"""The alignment objective for one batch of parallel sentences (see the package docstring): the alignment terms
(`OBJECTIVES`, one small class each, its formula in its docstring), the loss that adds them to the LM
cross-entropy and the English KL (`Objective`), the base model's English reference they compare against, and
the chunked KL."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from toolkit.capture import ResidualCapture, TokenBatch
from toolkit.config import AlignConfig
from toolkit.errors import UserError
from toolkit.models import LoadedModel
from toolkit.sae_set import LayerSAE, SAESet, plain_threshold

TERMS = ("ce", "align", "keep", "total")
KL_CHUNK_CPU = 1 << 20  # logits per chunk of the KL term: 4 MiB of fp32 stays in a CPU's cache
KL_CHUNK = 1 << 28  # on accelerators, few large kernels
SUMMARY_USES = 2.0  # the KL's base summary costs about two uses' worth of base logits (measured on CPU)
HEAD_CHUNK = 1 << 24  # logits per chunk where the LM head runs inside the chunk loop (64 rows of Gemma's 262k)
SURROGATE_BANDWIDTH = 0.5  # softplus width, in units of the batch's mean active code at the layer
FIT_WEIGHT = 5.0  # massfit: a 0.02 FVE drop at E ~ 0.3 is a ~7 % relative rise, an order below mass's hinge at first
PRE_FEATURES = 16  # English-favoured features per pair and layer that the `pre` hinge raises
EPS = 1e-8


def reference_uses(a: AlignConfig, n_train: int, n_targets: int = 1, world: int = 1) -> float:
    """How many times training uses each English training sentence, on average (its targets share them)."""
    return a.steps * a.grad_accum * a.batch_size * world * n_targets / max(n_train, 1)


# ------------------------------------------------------------------------------------------- SAE pieces


def haspre_activation(sae: torch.nn.Module) -> bool:
    """Whether `pre_activation` can read this SAE: a sae-lens SAE with one encoder (not gated)."""
    from sae_lens import SAE

    return isinstance(sae, SAE) and not type(sae).__name__.startswith("Gated") and hasattr(sae, "W_enc")


def pre_activation(layer_sae: LayerSAE, x: torch.Tensor) -> torch.Tensor:
    """The encoder's pre-activations (N, d_sae): the value each unit's activation function is applied to."""
    sae = layer_sae.sae
    pre = layer_sae.pre_activation(x)
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):  # sae-lens TopK SAEs may scale before the top-k
        pre = pre * sae.W_dec.norm(dim=-1)
    return pre


def _threshold(layer_sae: LayerSAE, pre: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The pre-activation a unit must exceed to be active: 0 (ReLU), the learnt threshold (JumpReLU, also the
    BatchTopK SAEs trained here), else per token the smallest active pre-activation (TopK's k-th value)."""
    from sae_lens import JumpReLUSAE, StandardSAE

    sae = layer_sae.sae
    if type(sae) is StandardSAE:
        return pre.new_zeros(())
    if type(sae) is JumpReLUSAE:
        return sae.threshold.detach().clamp_min(0)
    active = codes != 0
    smallest = torch.where(active, pre, torch.inf).amin(1, keepdim=True)
    return torch.where(active.any(1, keepdim=True), smallest, pre.new_zeros(())).clamp_min(0).detach()


def surrogate_codes(layer_sae: LayerSAE, x: torch.Tensor) -> torch.Tensor:
    """The SAE's codes of `x` (N, d_sae), equal in value, with a gradient through inactive units too.

    Active units pass the true gradient (d code / d pre = 1). An inactive unit j passes the gradient of
    tau * softplus((pre_j - theta_j) / tau), i.e. sigmoid((pre_j - theta_j) / tau) < 1/2, where theta_j is the
    unit's threshold (`_threshold`) and tau = SURROGATE_BANDWIDTH x the batch's mean active code at the layer:
    units just below their threshold feel it, units far below hardly. JumpReLU and (Batch)TopK SAEs pass no
    gradient through inactive units at all, so a loss that should turn features on needs this surrogate.
    """
    pre = pre_activation(layer_sae, x)
    plain = plain_threshold(layer_sae.sae)  # ReLU and JumpReLU: the codes from the same pre-activations
    codes = torch.where(pre > plain, pre, 0.0) if plain is not None else layer_sae.encode(x)
    theta = _threshold(layer_sae, pre, codes.detach())
    active = codes.detach() != 0
    tau = SURROGATE_BANDWIDTH * (codes.detach()[active].mean() if active.any() else pre.new_ones(()))
    soft = tau * F.softplus((pre - theta) / tau)
    return codes + torch.where(active, 0.0, soft - soft.detach())


# --------------------------------------------------------------------------------------- the alignment terms


class AlignTerm:
    """One alignment term. Per aligned layer l it compares pooled per-token statistics of the target sentence
    (adapted model, with gradient) with those of its English parallel (base model, fixed), over a batch of
    pairs: `loss(pool(target(h_l(T))), pool(reference(h_l^base(en))))`. pool is the mean over the sentence's
    measured tokens (BOS and padding excluded). The objective weights the layers (`Objective`)."""

    name = ""
    uses_saes = True  # `target` and `reference` read the layer's SAE
    needs_pre = False  # and its encoder's pre-activations
    baseline = False  # `loss` also gets the target sentence's own `base` statistics under the base model
    keeps_english = False  # `english` penalises the English sentence's `reference` statistics moving under the adapter

    def english(self, adapted: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target(self, sae: LayerSAE, x: torch.Tensor) -> torch.Tensor:
        return sae.encode(x)

    def reference(self, sae: LayerSAE, x: torch.Tensor) -> torch.Tensor:
        return sae.encode(x)

    def base(self, sae: LayerSAE, x: torch.Tensor) -> torch.Tensor:
        """The target sentence's statistics under the base model, where `baseline`."""
        return self.reference(sae, x)

    def loss(self, target: torch.Tensor, reference: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def check(self, saes: SAESet) -> None:
        """Refuse, before any training, SAEs this term cannot read."""
        if self.needs_pre:
            lacking = [layer for layer, s in sorted(saes.layers.items()) if not haspre_activation(s.sae)]
            if lacking:
                raise UserError(f"align.objective={self.name} needs the SAEs' pre-activations (a sae-lens SAE with "
                                f"one encoder); the SAEs of {saes.source} at layer(s) {lacking} have none: choose "
                                "another --objective or another --sae")


class Match(AlignTerm):
    """match: relative squared error of the pooled codes, sum_b ||p_b - q_b||^2 / sum_b ||q_b||^2 (p: target's
    pooled SAE codes, q: English's). Rewards similarity, not activity: where <p, q> < ||p||^2 its descent shrinks
    the target's codes, and it moves only features already active."""

    name = "match"

    def loss(self, target: torch.Tensor, reference: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        return ((target - reference) ** 2).sum() / (reference**2).sum().clamp(min=EPS)


class Cosine(AlignTerm):
    """cosine: mean over pairs of 1 - cos(p_b, q_b) of the pooled codes; blind to the codes' scale."""

    name = "cosine"

    def loss(self, target: torch.Tensor, reference: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        return (1 - F.cosine_similarity(target, reference, dim=1, eps=EPS)).mean()


class Masked(AlignTerm):
    """masked: match English only on the features English uses in the pair,
    sum_b ||(p~_b - q_b) * [q_b > 0]||^2 / sum_b ||q_b||^2, where p~ are the target's codes with the softplus
    surrogate gradient (`surrogate_codes`), so features English uses and the target does not can turn on."""

    name = "masked"
    needs_pre = True

    def target(self, sae: LayerSAE, x: torch.Tensor) -> torch.Tensor:
        return surrogate_codes(sae, x)

    def loss(self, target: torch.Tensor, reference: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        used = (reference > 0).to(target.dtype)
        return (((target - reference) * used) ** 2).sum() / (reference**2).sum().clamp(min=EPS)


class Mass(AlignTerm):
    """mass: a one-sided hinge on pooled activation mass, mean_b relu(M_en,b - M_T,b) / M_en,b, with
    M = sum_j of the pooled codes (English's from the base model; the target's through `surrogate_codes`).
    No penalty once the target reaches English; its descent raises M_T, on any feature."""

    name = "mass"
    needs_pre = True

    def target(self, sae: LayerSAE, x: torch.Tensor) -> torch.Tensor:
        return surrogate_codes(sae, x).sum(1, keepdim=True)

    def reference(self, sae: LayerSAE, x: torch.Tensor) -> torch.Tensor:
        return sae.encode(x).sum(1, keepdim=True)

    def loss(self, target: torch.Tensor, reference: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        return _hinge(target, reference)


class MassFit(Mass):
    """massfit: `mass`'s hinge plus FIT_WEIGHT x two terms that keep what the gain report guards, per layer
    mean_b [relu(M_en,b - M_T,b) / M_en,b + FIT_WEIGHT (relu(E_T,b - E^base_T,b) / E^base_T,b
                                                       + |M'_en,b - M_en,b| / M_en,b)], where
    E = sum_t ||x_t - x^_t||^2 / sum_t ||x_t - mu||^2 over the sentence's tokens (x^ the SAE's reconstruction from the
    codes, mu the mean of the batch's sentence means, same language and model: 1 - FVE about the sample's own mean,
    as the SAE-fit guard measures it, so a shrinking spread of the target's tokens counts as much as a growing error),
    E^base_T the same sentence's under the base model (one extra forward pass without gradient per step), and M'_en
    the English sentence's mass under the adapter (read from the pass the KL term makes anyway). The target is to
    gain mass without leaving what the SAE reconstructs and without raising English's own activation: the SAE-fit
    and retention guards measure the same on held-out sentences."""

    name = "massfit"
    baseline = True
    keeps_english = True

    def target(self, sae: LayerSAE, x: torch.Tensor) -> torch.Tensor:
        return mass_and_fit(sae, x, surrogate_codes(sae, x))

    # English (the reference, and under the adapter for the English term) needs its mass alone: `Mass.reference`
    def base(self, sae: LayerSAE, x: torch.Tensor) -> torch.Tensor:
        return mass_and_fit(sae, x, sae.encode(x))

    def loss(self, target: torch.Tensor, reference: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        error, base_error = fit_error(target), fit_error(base)
        # relu: no gradient at parity, so a fresh adapter (E = E^base) descends `mass` alone
        fit = (F.relu(error - base_error) / base_error.clamp(min=EPS)).mean()
        return _hinge(target[:, 0], reference[:, 0]) + FIT_WEIGHT * fit

    def english(self, adapted: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        # |.| has gradient 0 at 0: a fresh adapter (English unchanged) descends `mass` alone here too
        return FIT_WEIGHT * ((adapted[:, 0] - reference[:, 0]).abs() / reference[:, 0].clamp(min=EPS)).mean()


def mass_and_fit(sae: LayerSAE, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Per token (N, 3 + d): the code mass, the squared reconstruction error, ||x||^2 and x itself; their means over
    a sentence give its E (`fit_error`)."""
    error = ((x - sae.sae.decode(codes).to(x)) ** 2).sum(1)
    return torch.cat([codes.sum(1, keepdim=True), error[:, None], (x**2).sum(1, keepdim=True), x], dim=1)


def fit_error(pooled: torch.Tensor) -> torch.Tensor:
    """E per sentence (B,) from `mass_and_fit`'s sentence means: the mean squared error over the mean squared
    distance from mu, the mean of the batch's sentence means (mean ||x - mu||^2 = mean ||x||^2 - 2 mu . x_bar_b +
    ||mu||^2)."""
    sq, means = pooled[:, 2], pooled[:, 3:]
    mu = means.mean(0, keepdim=True)
    spread = sq - 2 * (means * mu).sum(1) + (mu**2).sum(1)
    return pooled[:, 1] / spread.clamp(min=EPS)


class Pre(AlignTerm):
    """pre: SASFT's one-sided hinge on SAE pre-activations, mirrored to raise. Per pair b, the English-favoured
    features F_b are the PRE_FEATURES features with the largest q_bj - p_bj among those with q_bj > p_bj (English
    uses them more in this very sentence pair); the loss is
    mean_b sum_{j in F_b} relu(q_bj - a_bj) / sum_{j in F_b} q_bj, with a_bj the target's pooled pre-activation
    of feature j. Pre-activations pass gradient whether or not a unit is active."""

    name = "pre"
    needs_pre = True

    def target(self, sae: LayerSAE, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([sae.encode(x).detach(), pre_activation(sae, x)], dim=1)

    def loss(self, target: torch.Tensor, reference: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        codes, pre = target.chunk(2, dim=1)
        favour = (reference - codes).clamp_min(0)
        k = min(PRE_FEATURES, favour.shape[1])
        chosen = favour.topk(k, dim=1).indices
        picked = favour.gather(1, chosen) > 0
        q = reference.gather(1, chosen) * picked
        hinge = (q - pre.gather(1, chosen)).clamp_min(0) * picked
        return (hinge.sum(1) / q.sum(1).clamp(min=EPS)).mean()


class Resid(AlignTerm):
    """resid: the control arm without SAEs, a one-sided hinge on the pooled residual norm,
    mean_b relu(N_en,b - N_T,b) / N_en,b with N the mean over tokens of ||h_l||. If it yields the same "SAE
    gain" as an SAE objective, that gain is scale."""

    name = "resid"
    uses_saes = False

    def target(self, sae: LayerSAE | None, x: torch.Tensor) -> torch.Tensor:
        return x.norm(dim=1, keepdim=True)

    reference = target

    def loss(self, target: torch.Tensor, reference: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        return _hinge(target, reference)


class NoAlign(AlignTerm):
    """none: no alignment term (CE + lambda_keep KL only), the baseline arm; the same as lambda_align = 0."""

    name = "none"
    uses_saes = False


def _hinge(target: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return ((reference - target).clamp_min(0) / reference.clamp(min=EPS)).mean()


OBJECTIVES: dict[str, type[AlignTerm]] = {
    t.name: t for t in (Match, Cosine, Masked, Mass, MassFit, Pre, Resid, NoAlign)}


def make_term(name: str) -> AlignTerm:
    """The alignment term called `name`; an unknown name is a UserError listing the known ones."""
    if name not in OBJECTIVES:
        raise UserError(f"align.objective {name!r} is unknown; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]()


# ---------------------------------------------------------------------------------------------- the loss


class Objective:
    """The alignment loss for one batch of parallel sentences; see the package docstring:

        loss = CE(T) + lambda_align * (1/|L|) sum_l w_l term_l + lambda_keep * KL(base || adapted) on English

    with the term of `align.objective` (`OBJECTIVES`). The English side of every term but the adapted KL comes
    from the frozen base model, so it is computed once per sentence (`EnglishReference`) instead of in every step,
    and every step's work is the adapted passes alone. Logits (a 262k vocabulary on Gemma) are computed for real
    tokens only, never for padding.
    """

    def __init__(self, lm: LoadedModel, saes: SAESet, weights: dict[str, dict[int, float]], a: AlignConfig,
                 summarise: bool = True):
        """`summarise`: keep the KL's base distributions as summaries where the LM head allows it (see
        `EnglishReference`); worth it when each English sentence is used at least `SUMMARY_USES` times."""
        self.lm = lm  # lm.model is the peft model: its hooks see base and adapted passes alike
        self.saes = saes
        self.weights = weights
        self.a = a
        self.term = make_term(a.objective)
        self.term.check(saes)
        for s in saes.layers.values():
            s.sae.requires_grad_(False)
        self.aligning = a.lambda_align > 0 and not isinstance(self.term, NoAlign)
        aligned = sorted({layer for lang in weights for layer in self.layers(lang)}) if self.aligning else []
        self.reference = EnglishReference(self, aligned, keep=a.lambda_keep > 0, summarise=summarise)

    def layers(self, lang: str) -> list[int]:
        return [layer for layer, w in sorted(self.weights[lang].items()) if w > 0]

    def __call__(self, forward: Callable, target: TokenBatch, english: TokenBatch,
                 lang: str) -> dict[str, torch.Tensor]:
        a = self.a
        layers = self.layers(lang) if self.aligning else []
        need_keep = a.lambda_keep > 0
        en_stats = self.reference.get(english)
        stats, hidden = self.forward_pass(forward, target, layers, self.term.target)
        ce = self.next_token_ce(hidden, target)
        zero = ce.new_zeros(())
        keep = zero
        en_adapted: dict[int, torch.Tensor] = {}
        if need_keep or (layers and self.term.keeps_english):
            en_layers = layers if self.term.keeps_english else []
            en_adapted, adapted = self.forward_pass(forward, english, en_layers, self.term.reference)
            if need_keep:
                keep = self.reference.kl(english, adapted[english.attention_mask.to(adapted.device).bool()])
        align = zero
        if layers:
            w = self.weights[lang]
            base = dict.fromkeys(layers)
            if self.term.baseline:  # the target sentence under the base model, without gradient
                with torch.no_grad(), self.lm.model.disable_adapter():
                    base, _ = self.forward_pass(self.lm.model, target, layers, self.term.base, hidden=False)
            align = sum(w[layer] * self.term.loss(stats[layer], en_stats[layer], base[layer]) for layer in layers)
            align += sum(w[layer] * self.term.english(en_adapted[layer], en_stats[layer]) for layer in en_adapted)
            align = align / len(self.weights[lang])
        total = ce + a.lambda_align * align + a.lambda_keep * keep
        return {"ce": ce, "align": align, "keep": keep, "total": total}

    def forward_pass(self, forward: Callable, batch: TokenBatch, layers: list[int],
                     stats: Callable[[LayerSAE | None, torch.Tensor], torch.Tensor] | None = None,
                     hidden: bool = True):
        """Pooled per-token `stats` (the term's) at `layers` and the final (normed) hidden states (B, L, d) of one
        forward pass.

        Without `hidden` only the pooled statistics come back (None for the states), and the pass stops after the
        last layer.
        """
        device = self.lm.device
        keep = batch.keep.to(device)
        lengths = keep.sum(1)
        owner = torch.arange(len(lengths), device=device).repeat_interleave(lengths)
        pooled: dict[int, torch.Tensor] = {}

        def sink(layer: int, states: torch.Tensor) -> None:
            values = stats(self.saes.layers.get(layer), states[keep].float())
            summed = values.new_zeros((len(lengths), values.shape[1])).index_add(0, owner, values)
            pooled[layer] = summed / lengths.clamp(min=1).unsqueeze(1).to(values.dtype)

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
    """What the frozen base model (adapter disabled) makes of each English sentence, kept per sentence id: the
    alignment term's pooled statistics at the aligned layers (its `reference`: codes, mass or residual norm),
    and what the KL term needs of its next-token distributions p.

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
    `kl` compute what is missing from the batch at hand. Statistics are kept sparse when most entries are zero.
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
        """The term's pooled statistics per aligned layer, (B, k)."""
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
            pooled, hidden = objective.forward_pass(model, batch, self.layers, objective.term.reference,
                                                    hidden=self.keep)
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
