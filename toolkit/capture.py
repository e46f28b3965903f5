"""Residual-stream capture: one forward pass, every selected layer, nothing kept around.

Our hook point is the output of decoder block i, which is what sae-lens and Gemma Scope call
`blocks.{i}.hook_resid_post`. In transformers, `hidden_states[i + 1]` equals it for every block
but the last, where the final norm has already been applied: hence hooks, not hidden_states.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
        """One forward pass of the decoder stack (no LM head), stopped after the last selected layer."""
        base = self.lm.model.get_decoder() if hasattr(self.lm.model, "get_decoder") else self.lm.model
        try:
            base(
                input_ids=batch.input_ids.to(self.lm.device),
                attention_mask=batch.attention_mask.to(self.lm.device),
                use_cache=False,
            )
        except _Done:
            pass
