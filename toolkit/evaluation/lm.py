"""`lingogap`: an lm-eval model that computes each context once for all of its continuations.

Registered through lm-eval's public API (``@register_model("lingogap")``, an ``lm_eval.api.model.LM``
subclass), so nothing private of lm-eval is touched. It reads the same numbers as lm-eval's ``HFLM``:

- tokenisation as HFLM's: ``tokenizer.encode`` with the tokenizer's own special tokens (no BOS added
  when the text already starts with it); trailing spaces of a context move to its continuation; the
  continuation is ``encode(context + continuation)`` minus the context's tokens; an empty context is
  the prefix token (BOS, else EOS);
- requests are grouped by context tokens. The context runs once with the KV cache on; its last
  position scores every continuation's first token, and the continuations' remaining tokens run
  together on copies of that cache (right-padded, so no mask is needed). Single-token continuations
  (MMLU's letters) need no second call at all. Only the positions that are scored go through the
  output embedding, whose 262k-row projection costs more than a transformer block on Gemma 3;
- a request longer than ``max_length + 1`` tokens is cut from the left as HFLM cuts it, and scored
  on its own (its context then differs from its siblings');
- ``loglikelihood_rolling`` uses lm-eval's public rolling-window helpers with HFLM's arguments.

Log-softmax is taken in float32 whatever the model dtype.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from toolkit.errors import UserError

DEFAULT_MAX_LENGTH = 2048  # HFLM's fallback when neither the config nor the tokenizer says


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

        out = []
        for req in requests:
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = sum(ll for ll, _ in self.score_tokens([(list(c), list(t)) for c, t in windows]))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
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
        """Several contexts and all their continuations in two model calls.

        1. prefixes: every context but its last token, left-padded (as batched generation pads), with
           the KV cache on and no output embedding at all;
        2. tails: per distinct continuation, the context's last token + the continuation but its last
           token, on its context's cache rows, right-padded; the output embedding sees only real
           positions. Row j of a tail predicts token j of the continuation.
        Left padding keeps each row's distances between tokens, so sliding-window attention is exact."""
        prefixes = [ctx[:-1] for ctx, _ in groups]
        width = max(map(len, prefixes))
        mask = torch.zeros((len(groups), width), dtype=torch.long)
        for g, prefix in enumerate(prefixes):
            mask[g, width - len(prefix):] = 1
        cache = None
        if width:
            ids = torch.full((len(groups), width), self.pad_id, dtype=torch.long)
            for g, prefix in enumerate(prefixes):
                ids[g, width - len(prefix):] = torch.tensor(prefix, dtype=torch.long)
            out = self._forward(ids, torch.zeros_like(mask, dtype=torch.bool), attention_mask=mask,
                                position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=True)
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        tails: dict[tuple[int, tuple[int, ...]], int] = {}  # (group, tail tokens) -> row; equal tails share a row
        for g, (ctx, conts) in enumerate(groups):
            for cont in conts:
                tails.setdefault((g, (ctx[-1], *cont[:-1])), len(tails))
        logps = self._score_tails(cache, mask, [len(p) for p in prefixes], list(tails))
        return [[_total(logps[tails[(g, (ctx[-1], *c[:-1]))]], c) for c in conts] for g, (ctx, conts) in
                enumerate(groups)]

    def _score_tails(self, cache, prefix_mask: torch.Tensor, prefix_lengths: list[int],
                     rows: list[tuple[int, tuple[int, ...]]]) -> list[torch.Tensor]:
        """Log-probs at every position of each (group, tail) row, each row on its group's cache."""
        width = max(len(tail) for _, tail in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        keep = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, (_, tail) in enumerate(rows):
            ids[r, :len(tail)] = torch.tensor(tail, dtype=torch.long)
            keep[r, :len(tail)] = True
        group = torch.tensor([g for g, _ in rows])
        start = torch.tensor(prefix_lengths)[group]
        kwargs = {"position_ids": start[:, None] + torch.arange(width)[None]}
        if cache is not None:
            cache.batch_select_indices(group.to(self._device))  # each row reads its own context
            kwargs |= {"use_cache": True, self._cache_kwarg: cache,
                       "attention_mask": torch.cat([prefix_mask[group], torch.ones((len(rows), width),
                                                                                   dtype=torch.long)], dim=1)}
        logits = self._forward(ids, keep, **kwargs).logits
        logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)
        return list(torch.split(logp, [len(tail) for _, tail in rows]))

    def _score_truncated(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        """A request longer than the model's window, cut from the left exactly as HFLM cuts it."""
        ids = (ctx + cont)[-(self.max_length + 1):][:-1]
        with torch.no_grad():
            logits = self._forward(torch.tensor([ids]), logits_to_keep=len(cont)).logits[0]
        return _total(torch.log_softmax(logits.float(), dim=-1), cont)


def _total(logp: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
    """Sum of the continuation's log-probs (row j predicts cont[j]) and whether each is the argmax."""
    target = torch.tensor(cont, device=logp.device)
    picked = logp.gather(1, target[:, None])[:, 0]
    return float(picked.sum()), bool((logp.argmax(dim=-1) == target).all())


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
