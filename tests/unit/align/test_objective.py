"""The objective (with the `match` term) equals the plain computation of the package docstring's formula, in value
and gradient."""

import contextlib
import dataclasses

import pytest
import torch

from toolkit import align


def _naive_losses(lm, saes, weights: dict[int, float], a, target, english) -> dict[str, torch.Tensor]:
    """The objective exactly as the module docstring states it, computed the plain way: the base model's English
    pass inline, SAE codes over padded batches masked afterwards, full logits over every position."""
    from toolkit.capture import ResidualCapture

    model, layers = lm.model, [layer for layer, w in sorted(weights.items()) if w > 0]

    def run(batch, layers):
        pooled, keep = {}, batch.keep.unsqueeze(-1).float()

        def sink(layer, hidden):
            codes = saes.layers[layer].sae.encode(hidden.float())
            pooled[layer] = (codes * keep).sum(1) / keep.sum(1)

        with ResidualCapture(lm, layers, sink, grad=True) if layers else contextlib.nullcontext():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return pooled, logits.float()

    with torch.no_grad(), model.disable_adapter():
        en_codes, en_logits = run(english, layers)
    codes, logits = run(target, layers)
    labels = target.input_ids[:, 1:].masked_fill(target.attention_mask[:, 1:] == 0, -100)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
    align_ = sum(weights[layer] * ((codes[layer] - en_codes[layer]) ** 2).sum() / (en_codes[layer] ** 2).sum()
                 for layer in layers) / len(weights)
    _, adapted = run(english, [])
    real = english.attention_mask.bool()
    log_q, log_p = (torch.log_softmax(x[real], -1) for x in (adapted, en_logits))
    keep = (log_p.exp() * (log_p - log_q)).sum() / real.sum()
    return {"ce": ce, "align": align_, "keep": keep, "total": ce + a.lambda_align * align_ + a.lambda_keep * keep}


@pytest.mark.parametrize("softcap", [True, False], ids=["softcapped-head", "linear-head"])
def test_objective_equals_the_plain_computation_in_value_and_gradient(tiny, softcap):
    """The objective's shortcuts (cached English reference, LM head on real tokens only, chunked KL, the KL from
    mean embeddings for a linear head) change nothing that is optimised: same loss terms and same LoRA gradients
    as the plain computation. The tiny model soft-caps its logits as Gemma 2 does; without it, its head is
    linear as Gemma 3's is."""
    cfg, lm, saes, corpus, split, layers = tiny
    cfg = cfg.merged({"align": {"objective": "match"}})  # the formula `_naive_losses` writes out
    saved_cap = lm.model.config.final_logit_softcapping
    if not softcap:
        lm.model.config.final_logit_softcapping = None
    weights = {layer: float(k + 1) for k, layer in enumerate(layers)}
    weights[layers[0]] = 0.0  # a layer left out of the alignment term
    ids = split.train[:5]
    target, english = (align.collate(lm.tokenizer, [(s, dict(corpus.sentences(lang))[s]) for s in ids], 160)
                       for lang in ("hi", "en"))
    assert (target.attention_mask == 0).any() and (english.attention_mask == 0).any()  # padding is exercised
    torch.manual_seed(1)
    model = align.attach_lora(lm.model, cfg.align, lm.n_layers)
    try:
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)  # a trained-looking adapter, so the KL is not zero
        model.eval()  # no LoRA dropout: both computations see the same network
        peft_lm = dataclasses.replace(lm, model=model)
        params = [p for p in model.parameters() if p.requires_grad]
        objective = align.Objective(peft_lm, saes, {"hi": weights}, cfg.align)
        assert objective.reference.linear is not softcap
        objective.reference.fill([align.collate(lm.tokenizer, [(s, dict(corpus.sentences("en"))[s])], 160)
                                  for s in ids[::-1]])  # filled one sentence at a time, in another order
        fast = objective(model, target, english, "hi")
        fast_grads = torch.autograd.grad(fast["total"], params)
        plain = _naive_losses(peft_lm, saes, weights, cfg.align, target, english)
        plain_grads = torch.autograd.grad(plain["total"], params)
        assert fast["keep"] > 1e-4 and fast["align"] > 0
        for k in align.TERMS:
            torch.testing.assert_close(fast[k], plain[k], rtol=1e-4, atol=1e-6)
        for f, p in zip(fast_grads, plain_grads, strict=True):
            torch.testing.assert_close(f, p, rtol=1e-3, atol=1e-6)
        objective.reference.clear()  # computed on the fly from the batch itself: the same values
        torch.testing.assert_close(objective(model, target, english, "hi")["total"], plain["total"],
                                   rtol=1e-4, atol=1e-6)
    finally:
        lm.model = model.unload()
        lm.model.config.final_logit_softcapping = saved_cap
