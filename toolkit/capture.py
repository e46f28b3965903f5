"""Residual-stream capture: one forward pass, every selected layer, nothing kept around.

Our hook point is the output of decoder block i, which is what sae-lens and Gemma Scope call
`blocks.{i}.hook_resid_post`. In transformers, `hidden_states[i + 1]` equals it for every block
but the last, where the final norm has already been applied: hence hooks, not hidden_states.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from toolkit.models import LoadedModel, decoder_layers

HOOK_TEMPLATE = "blocks.{layer}.hook_resid_post"


def hook_name(layer: int) -> str:
    return HOOK_TEMPLATE.format(layer=layer)


class _Done(Exception):
    """Raised after the last selected layer so later blocks and the LM head never run."""


@dataclass
class TokenBatch:
    sentence_ids: list[str]
    input_ids: torch.Tensor  # (B, L) right-padded, BOS first
    attention_mask: torch.Tensor  # (B, L)

    @property
    def keep(self) -> torch.Tensor:
        """(B, L) mask of the tokens we measure: real tokens except BOS."""
        keep = self.attention_mask.bool().clone()
        keep[:, 0] = False
        return keep

    @property
    def n_real(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def n_padded(self) -> int:
        return self.input_ids.numel()


def plan_batches(lengths: list[int], batch_tokens: int, max_padding: float = 1.15) -> list[list[int]]:
    """Group sentence indices by length so each batch pads to its own longest sentence.

    Longest first (ties by index, so the plan is deterministic); a batch closes when the next
    sentence would exceed `batch_tokens` padded tokens or make padded/real tokens exceed
    `max_padding`. Padding to a fixed length instead wastes ~4x the compute on NTREX.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        if current:
            padded = (len(current) + 1) * lengths[current[0]]
            if padded > batch_tokens or padded > max_padding * (real + lengths[i]):
                batches.append(current)
                current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        batches.append(current)
    return batches


def tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids with BOS first (added when the tokenizer does not add it itself), at most `max_length`
    tokens or the model's context (`models.limit_context`), whichever is shorter."""
    max_length = context_limit(tokenizer, max_length)
    encoded = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    bos = tokenizer.bos_token_id
    return [ids if ids and ids[0] == bos else ([bos] + ids)[:max_length] for ids in encoded]


def context_limit(tokenizer, max_length: int) -> int:
    limit = getattr(tokenizer, "model_max_length", None)
    return min(max_length, int(limit)) if isinstance(limit, int) and limit > 0 else max_length


def count_truncated(tokenizer, texts: list[str], max_length: int) -> int:
    """How many texts `tokenize` cuts at `max_length` tokens (BOS included) or at the model's context."""
    max_length = context_limit(tokenizer, max_length)
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    return sum(len(ids) + (0 if ids and ids[0] == bos else 1) > max_length for ids in encoded)


def iter_batches(
    sentences: list[tuple[str, str]], tokenizer, batch_tokens: int, max_length: int
) -> Iterator[TokenBatch]:
    ids = tokenize(tokenizer, [text for _, text in sentences], max_length)
    pad = tokenizer.pad_token_id
    for group in plan_batches([len(t) for t in ids], batch_tokens):
        width = max(len(ids[i]) for i in group)
        input_ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, i in enumerate(group):
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        yield TokenBatch([sentences[i][0] for i in group], input_ids, mask)


class ResidualCapture:
    """Forward hooks on the selected decoder blocks; each output goes to `sink(layer, tensor)` at once.

    For measurement (`grad=False`, the default) tensors are detached and the forward pass stops
    after the last selected layer. Training (`grad=True`) gets the live tensors and a full pass.
    """

    def __init__(self, lm: LoadedModel, layers: list[int], sink: Callable[[int, torch.Tensor], None],
                 grad: bool = False):
        self.lm = lm
        self.layers = sorted(layers)
        self.sink = sink
        self.grad = grad
        self._handles: list = []

    def __enter__(self) -> ResidualCapture:
        blocks = decoder_layers(self.lm.model, self.lm.hook_module)
        last = self.layers[-1]
        for layer in self.layers:
            def hook(module, args, output, layer=layer):
                # transformers 5 returns a Tensor; older releases a tuple whose first item it is
                hidden = output[0] if isinstance(output, tuple) else output
                self.sink(layer, hidden if self.grad else hidden.detach())
                if layer == last and not self.grad:
                    raise _Done

            self._handles.append(blocks[layer].register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def run(self, batch: TokenBatch) -> None:
        """One forward pass of the decoder stack (no LM head), stopped after the last selected layer; or none,
        when the job's shared forward pass (`shared_forward`) already holds this batch's residuals."""
        if not self.grad and _shared is not None and _shared.serve(batch, self.layers, self.sink):
            return
        base = self.lm.model.get_decoder() if hasattr(self.lm.model, "get_decoder") else self.lm.model
        try:
            base(
                input_ids=batch.input_ids.to(self.lm.device),
                attention_mask=batch.attention_mask.to(self.lm.device),
                use_cache=False,
            )
        except _Done:
            pass


class SharedResiduals:
    """One forward pass over a job's extraction batches, kept for every stage of the job that needs it.

    Extraction needs SAEs, and SAEs trained on first use need the residuals of the same sentences: without
    sharing, the corpus went through the model three times (training activations, held-out quality,
    extraction). A job registers its extraction batches (`shared_forward`); local SAE training calls `prepare`,
    which runs those batches once and keeps every selected layer's measured tokens (BOS and padding excluded)
    when they fit `max_bytes`. Then `ResidualCapture.run` (without grad) serves a batch whose sentences are all
    kept: extraction's own batches from their own entry, so its values are exactly the forward pass's (and each
    entry is dropped once extraction took it); any other grouping (the training sample, the held-out sentences)
    sentence by sentence, which can differ from a forward pass of that grouping in the last bits.
    """

    def __init__(self, lm: LoadedModel, layers: list[int], plan: Callable[[], list[TokenBatch]], max_bytes: int):
        self.lm = lm
        self.layers = sorted(layers)
        self.plan = plan
        self.max_bytes = max_bytes
        self.entries: dict[bytes, dict[int, torch.Tensor]] = {}
        self.sentences: dict[tuple[int, ...], tuple[bytes, int, int]] = {}  # token ids -> entry, first, end row
        self.seconds = 0.0  # the forward pass's wall time, reported beside the phase that ran it
        self.ready = False

    @functools.cached_property
    def batches(self) -> list[TokenBatch]:
        """The job's batches, planned (tokenised) only when a stage asks for the pass."""
        return self.plan()

    @property
    def tokens(self) -> int:
        """Measured tokens of the batches (BOS and padding excluded)."""
        return sum(int(b.keep.sum()) for b in self.batches)

    @property
    def nbytes(self) -> int:
        itemsize = torch.empty((), dtype=self.lm.dtype).element_size()
        return self.tokens * len(self.layers) * self.lm.d_model * itemsize

    def prepare(self, advance: Callable[[int], None] | None = None) -> bool:
        """Run the batches once and keep their residuals; False (nothing kept) when they would pass `max_bytes`.
        `advance(tokens)` after each batch."""
        if self.ready or not self.batches or self.nbytes > self.max_bytes:
            return self.ready
        start = time.perf_counter()
        state: dict = {}

        def sink(layer: int, hidden: torch.Tensor) -> None:
            state["entry"][layer] = hidden[state["keep"]]  # what extraction's own sink computes first

        with torch.inference_mode(), ResidualCapture(self.lm, self.layers, sink) as cap:
            for batch in self.batches:
                state["entry"] = {}
                state["keep"] = batch.keep.to(self.lm.device)
                cap.run(batch)
                key = _batch_key(batch)
                self.entries[key] = state["entry"]
                for ids, first, end in _rows(batch):
                    self.sentences.setdefault(ids, (key, first, end))
                if advance is not None:
                    advance(int(state["keep"].sum()))
        self.seconds = time.perf_counter() - start
        self.ready = True
        return True

    def holds(self, texts: list[str], max_length: int) -> bool:
        """Whether the kept pass has every one of these sentences (tokenised as the batches are)."""
        kept = self.sentences
        return self.ready and all(tuple(ids) in kept for ids in tokenize(self.lm.tokenizer, texts, max_length))

    def serve(self, batch: TokenBatch, layers: list[int], sink: Callable[[int, torch.Tensor], None]) -> bool:
        """Hand `sink` each layer's (B, L, d) residual of `batch` (zeros where nothing is measured) from the kept
        pass, if it holds them all; False to leave the batch to a forward pass."""
        if not self.ready or not set(layers) <= set(self.layers):
            return False
        key = _batch_key(batch)
        entry = self.entries.pop(key, None)
        if entry is None:
            where = [self.sentences.get(ids) for ids, _, _ in _rows(batch)]
            if any(w is None or w[0] not in self.entries for w in where):
                return False
            entry = {layer: torch.cat([self.entries[k][layer][first:end] for k, first, end in where])
                     for layer in layers}
        keep = batch.keep.to(self.lm.device)
        for layer in layers:
            kept = entry[layer]
            hidden = kept.new_zeros((*batch.input_ids.shape, kept.shape[-1]))
            hidden[keep] = kept
            sink(layer, hidden)
        return True


def _batch_key(batch: TokenBatch) -> bytes:
    return repr(tuple(batch.input_ids.shape)).encode() + batch.input_ids.numpy().tobytes() + \
        batch.attention_mask.numpy().tobytes()


def _rows(batch: TokenBatch) -> Iterator[tuple[tuple[int, ...], int, int]]:
    """Each sentence's token ids and its rows among the batch's measured tokens (row-major, BOS excluded)."""
    first = 0
    for ids, n in zip(batch.input_ids.tolist(), batch.attention_mask.sum(1).tolist()):
        yield tuple(ids[:n]), first, first + n - 1
        first += n - 1


_shared: SharedResiduals | None = None


@contextmanager
def shared_forward(lm: LoadedModel, layers: list[int], plan: Callable[[], list[TokenBatch]],
                   max_bytes: int) -> Iterator[SharedResiduals]:
    """Within this block, the job's shared forward pass (`job_shared_forward`) is the batches `plan()` gives,
    run when a stage that needs more than extraction's pass (local SAE training) prepares it."""
    global _shared
    before = _shared
    _shared = SharedResiduals(lm, layers, plan, max_bytes)
    try:
        yield _shared
    finally:
        _shared = before


def job_shared_forward() -> SharedResiduals | None:
    """The shared forward pass the running job registered (`shared_forward`), prepared or not; None without one."""
    return _shared
