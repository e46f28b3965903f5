"""`lingogap`: an lm-eval model that computes each context once for all of its continuations.

Registered through lm-eval's public API (``@register_model("lingogap")``, an ``lm_eval.api.model.LM``
subclass), so nothing private of lm-eval is touched. It reads the same numbers as lm-eval's ``HFLM``:

- tokenisation as HFLM's: ``tokenizer.encode`` with the tokenizer's own special tokens (no BOS added
  when the text already starts with it); trailing spaces of a context move to its continuation; the
  continuation is ``encode(context + continuation)`` minus the context's tokens; an empty context is
  the prefix token (BOS, else EOS);
- requests are grouped by context tokens, and contexts of similar length are batched (left-padded, as
  batched generation pads). The contexts run once with the KV cache on; their last position scores
  every continuation's first token, so single-token continuations (MMLU's letters) need nothing
  more. The other continuations run on their context's cache rows, right-padded, in chunks of similar
  length. Only scored positions go through the output embedding, whose 262k-row projection costs
  more than a transformer block on Gemma 3 and is what bounds ARC's speed-up;
- a request longer than ``max_length + 1`` tokens is cut from the left as HFLM cuts it, and scored
  on its own (its context then differs from its siblings');
- ``loglikelihood_rolling`` uses lm-eval's public rolling-window helpers with HFLM's arguments.

Log-probabilities are computed in float32 whatever the model dtype.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from toolkit.errors import UserError

DEFAULT_MAX_LENGTH = 2048  # HFLM's fallback when neither the config nor the tokenizer says
MAX_SCORED = 512  # positions whose logits one call holds


@register_model("lingogap")
class SharedContextLM(LM):
    """Log-likelihoods of an in-memory causal LM (or a model directory), each context computed once."""

    def __init__(self, pretrained: torch.nn.Module | str, tokenizer=None, batch_size: int | str = 8,
                 max_length: int | None = None, device: str | None = None) -> None:
        super().__init__()
        if isinstance(pretrained, str):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = tokenizer or AutoTokenizer.from_pretrained(pretrained)
            pretrained = AutoModelForCausalLM.from_pretrained(pretrained)
        if tokenizer is None:
            raise UserError("the lingogap lm-eval model needs a tokenizer with an in-memory model")
        self.model = pretrained.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self._device = torch.device(device) if device else next(self.model.parameters()).device
        if device:
            self.model.to(self._device)
        self._max_length = max_length
        self._cache_kwarg = _cache_kwarg(self.model)
        self._bos_text = tokenizer.decode(self.prefix_token_id)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.prefix_token_id

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> SharedContextLM:
        from lm_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        args.update({k: v for k, v in (additional_config or {}).items() if k in ("batch_size", "device")})
        return cls(**args)

    # ------------------------------------------------------------------------------------ tokenisation

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        config = getattr(self.model, "config", None)
        for cfg in (getattr(config, "text_config", None), config):  # HFLM reads a nested text config first
            for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
                if getattr(cfg, attr, None):
                    return getattr(cfg, attr)
        limit = getattr(self.tokenizer, "model_max_length", None)
        return limit if limit and limit < 1e9 else DEFAULT_MAX_LENGTH

    def tok_encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        if add_special_tokens is None and self._bos_text and text.startswith(self._bos_text):
            add_special_tokens = False  # the text carries its BOS already
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(text, **kwargs)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokens exactly as lm-eval's causal models split them."""
        if context == "":
            cont = self.tok_encode(continuation, add_special_tokens=False)
            return ([self.prefix_token_id], cont) if cont[0] != self.prefix_token_id else (cont[:1], cont[1:])
        spaces = len(context) - len(context.rstrip())
        if spaces:  # "Answer: " + "A" is scored as "Answer:" + " A", the way the text tokenises
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self.tok_encode(context + continuation), self.tok_encode(context)
        return ctx, whole[len(ctx):]

    # ------------------------------------------------------------------------------------ lm-eval API

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*req.args) for req in requests]
        out = self.score_tokens(pairs)
        for req, answer in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        owner, windows = [], []  # every text's windows scored together, in batches, then summed per text
        for k, req in enumerate(requests):
            for context, target in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(req.args[0]), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                owner.append(k)
                windows.append((list(context), list(target)))
        out = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, self.score_tokens(windows), strict=True):
            out[k] += ll
        for req, total in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise UserError("the lingogap scorer computes log-likelihoods only (multiple choice and rolling "
                        "perplexity); a generative task needs --eval-scorer hflm")

    # ------------------------------------------------------------------------------------ scoring

    def score_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log-likelihood, is-greedy) of each (context tokens, continuation tokens) pair, in order."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            if not ctx or not cont:
                raise ValueError("a log-likelihood request needs context and continuation tokens")
            if len(ctx) + len(cont) > self.max_length + 1:
                out[i] = self._score_truncated(ctx, cont)
            else:
                groups.setdefault(tuple(ctx), []).append(i)
        with torch.no_grad():
            for batch in self._batches(list(groups.items())):
                answers = self._score_batch([(list(ctx), [pairs[i][1] for i in members]) for ctx, members in batch])
                for (_, members), group in zip(batch, answers, strict=True):
                    for i, answer in zip(members, group, strict=True):
                        out[i] = answer
        return out  # type: ignore[return-value]

    def _batches(self, groups: list) -> Iterator[list]:
        """Groups longest context first, up to `batch_size` per batch, none padded by more than a quarter."""
        batch: list = []
        for group in sorted(groups, key=lambda g: -len(g[0])):
            if batch and (len(batch) == self.batch_size or 4 * len(group[0]) < 3 * len(batch[0][0])):
                yield batch
                batch = []
            batch.append(group)
        if batch:
            yield batch

    def _forward(self, ids: torch.Tensor, keep: torch.Tensor | None = None, **kwargs):
        """One model call; with `keep` (a bool mask over ids), logits only at those positions, flattened."""
        kwargs = {k: v.to(self._device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        with _only_rows(self.model, keep):
            return self.model(input_ids=ids.to(self._device), **kwargs)

    def _score_batch(self, groups: list[tuple[list[int], list[list[int]]]]) -> list[list[tuple[float, bool]]]:
        """Several contexts and all their continuations in one model call, plus one per chunk of tails.

        1. contexts, left-padded (as batched generation pads), with the KV cache on; the output
           embedding sees only their last position, which scores every continuation's first token;
        2. tails: each distinct continuation but its last token, on its context's cache rows,
           right-padded, the output embedding on real positions only; position j predicts token j + 1.
        Left padding keeps each row's distances between tokens, so sliding-window attention is exact."""
        width = max(len(ctx) for ctx, _ in groups)
        mask = torch.zeros((len(groups), width), dtype=torch.long)
        ids = torch.full((len(groups), width), self.pad_id, dtype=torch.long)
        for g, (ctx, _) in enumerate(groups):
            mask[g, width - len(ctx):] = 1
            ids[g, width - len(ctx):] = torch.tensor(ctx, dtype=torch.long)
        last = torch.zeros_like(mask, dtype=torch.bool)
        last[:, -1] = True
        out = self._forward(ids, last, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                            use_cache=True)
        first = out.logits.reshape(len(groups), -1).float()
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        tails = {(g, tuple(c[:-1])): None for g, (_, conts) in enumerate(groups) for c in conts if len(c) > 1}
        rows = sorted(tails, key=lambda row: -len(row[1]))
        chunks = list(_similar_lengths(rows))
        logps: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
        for k, chunk in enumerate(chunks):
            # each chunk selects its rows from the cache in place: all but the last work on a copy
            own = cache if k == len(chunks) - 1 else copy.deepcopy(cache)
            logps.update(zip(chunk, self._score_tails(own, mask, [len(ctx) for ctx, _ in groups], chunk), strict=True))
        return [[_total(torch.cat([first[g:g + 1], *([logps[(g, tuple(c[:-1]))]] if len(c) > 1 else [])]), c)
                 for c in conts] for g, (_, conts) in enumerate(groups)]

    def _score_tails(self, cache, context_mask: torch.Tensor, context_lengths: list[int],
                     rows: list[tuple[int, tuple[int, ...]]]) -> list[torch.Tensor]:
        """Log-probs at every position of each (group, tail) row, each row on its group's cache."""
        width = max(len(tail) for _, tail in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        keep = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, (_, tail) in enumerate(rows):
            ids[r, :len(tail)] = torch.tensor(tail, dtype=torch.long)
            keep[r, :len(tail)] = True
        group = torch.tensor([g for g, _ in rows])
        cache.batch_select_indices(group.to(self._device))  # each row reads its own context
        mask = torch.cat([context_mask[group], torch.ones((len(rows), width), dtype=torch.long)], dim=1)
        positions = torch.tensor(context_lengths)[group][:, None] + torch.arange(width)[None]
        logits = self._forward(ids, keep, attention_mask=mask, position_ids=positions, use_cache=True,
                               **{self._cache_kwarg: cache}).logits
        return list(torch.split(logits.reshape(-1, logits.shape[-1]).float(), [len(tail) for _, tail in rows]))

    def _score_truncated(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        """A request longer than the model's window, cut from the left exactly as HFLM cuts it."""
        ids = (ctx + cont)[-(self.max_length + 1):][:-1]
        with torch.no_grad():
            logits = self._forward(torch.tensor([ids]), logits_to_keep=len(cont)).logits[0]
        return _total(logits.float(), cont)


def _similar_lengths(rows: list[tuple[int, tuple[int, ...]]]) -> Iterator[list]:
    """Rows (longest first) in chunks whose rows are at least half as long as the chunk's first (answer
    options of 1 to 30 tokens padded to one width would spend half the tail computation on padding) and
    that score at most `MAX_SCORED` positions (each holds a vocabulary-wide row of logits: 1 MB on Gemma)."""
    chunk: list = []
    scored = 0
    for row in rows:
        if chunk and (2 * len(row[1]) < len(chunk[0][1]) or scored + len(row[1]) > MAX_SCORED):
            yield chunk
            chunk, scored = [], 0
        chunk.append(row)
        scored += len(row[1])
    if chunk:
        yield chunk


def _total(logits: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
    """Sum of the continuation's log-probs (logits row j predicts cont[j]) and whether each is the argmax.

    log_softmax, not logit - logsumexp: Gemma's logits reach the hundreds, where the subtraction loses
    ~1e-4 per continuation against HFLM."""
    target = torch.tensor(cont, device=logits.device)
    picked = torch.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0]
    return float(picked.sum()), bool((logits.argmax(dim=-1) == target).all())


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (whose forward takes **kwargs)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers 5.24 renames `past_key_values` to `cache` (the old name is deprecated)."""
    params = inspect.signature(_base(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@contextmanager
def _only_rows(model: torch.nn.Module, keep: torch.Tensor | None):
    """Feed the output embedding only the hidden states at `keep` (as one flat sequence), or all of them.

    The head is per position and what follows it (Gemma's logit soft-capping) elementwise, so the
    logits of the kept positions are unchanged; padding never reaches the vocabulary projection."""
    if keep is None:
        yield
        return
    head = _base(model).get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _, args: (args[0][keep.to(args[0].device)][None],))
    try:
        yield
    finally:
        handle.remove()
