"""Activation-aware LoRA on the embedded Gemma 3 270M: a few steps on NTREX Hindi with small local SAEs."""

import dataclasses
import json
import math

import pytest

from jobs import align as align_job
from toolkit.config import Config
from toolkit.rundir import RunDir


@pytest.mark.integration
@pytest.mark.slow  # 25-36 s beside the rest of the suite with the massfit default; .ci/run runs it
def test_a_short_hindi_run_writes_finite_metrics_and_before_after(ntrex, tmp_path):
    cfg = Config.build({
        "run": {"run": str(tmp_path), "langs": "hi", "corpus": f"ntrex:{ntrex}", "max_sentences": 15,
                "layers": "0-17:8"},
        "sae": {"source": "train", "width": 256, "train_tokens": 3000, "batch": 256},
        "extract": {"max_length": 32},
        "align": {"steps": 3, "batch_size": 1, "checkpoint_every": 2, "align_layers": "0-17:8"},
    }, preset="embedded")
    summaries = align_job.run(cfg)
    assert [s["unit"] for s in summaries] == ["hi"]
    folder = tmp_path / "align" / "hi"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["complete"] and [s["step"] for s in metrics["steps"]] == [1, 2, 3]
    for record in metrics["steps"] + metrics["validation"]:
        assert all(math.isfinite(record[k]) for k in ("ce", "align", "keep", "total")), record
    assert metrics["gap_source"]["hi"].startswith("measured on")
    assert (folder / "adapter" / "adapter_config.json").is_file()
    report = json.loads((folder / "before_after.json").read_text())
    assert set(report["languages"]) == {"en", "hi"} and report["heldout_sentences"] == 3
    for lang, v in report["languages"].items():
        values = [*v["gain_pct"].values(), v["ppl_before"], v["ppl_after"]]
        assert all(x is not None and math.isfinite(x) for x in values), (lang, v)
    assert math.isfinite(report["english_retention_pct"])
    assert summaries[0]["english_retention_pct"] == report["english_retention_pct"]
    hi = report["alignment"]["hi"]  # the gain report, on Gemma 3's real JumpReLU SAEs
    assert hi["weighted_layers"] and set(hi["weighted_layers"]) <= {0, 8, 16}
    for key in ("gain_pct", "norm_adjusted_gain_pct", "resid_norm_change_pct", "target_bpb"):
        assert math.isfinite(hi[key]), key
    assert 0 <= hi["english"]["kl"] < 1 and math.isfinite(hi["english"]["bpb_after"])
    quality = hi["sae_quality"]  # SAEs from 3,000 tokens may explain less than the mean does: FVE <= 1, finite
    assert quality["fve_after"].keys() == quality["fve_before"].keys() == set(map(str, hi["weighted_layers"]))
    assert all(math.isfinite(v) and v <= 1 for v in [*quality["fve_after"].values(), quality["fve_drop"]])
    assert report["summary"]["objective"] == "massfit" and isinstance(report["summary"]["guards_ok"], bool)
    assert "grad_align" in metrics["steps"][0] and "grad_align" in metrics["steps"][1]  # first step, checkpoint


@pytest.mark.integration
def test_the_summarised_kl_equals_the_recomputed_one_on_gemma3(ntrex, tmp_path):
    """Gemma 3's LM head is linear, so training keeps the KL's base side as per-token summaries (mean embedding,
    negative entropy) instead of recomputing base logits: the same loss terms and LoRA gradients either way."""
    import torch

    from toolkit import align, models
    from toolkit import corpus as corpora
    from toolkit import saes as sae_sources

    cfg = Config.build({"run": {"run": str(tmp_path), "langs": "hi", "corpus": f"ntrex:{ntrex}", "max_sentences": 8},
                        "sae": {"source": "random", "width": 512}, "extract": {"max_length": 48},
                        # the 1e-3 bound below was measured at lambda_keep 3: the summary's float32 rounding enters
                        # the gradient times lambda_keep (at the default 4 it reached 1.2e-3 of |g|)
                        "align": {"align_layers": "0-17:8", "lambda_keep": 3.0}}, preset="embedded")
    corpus = corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)
    lm = models.load(cfg.model)
    layers = [0, 8, 16]
    saes = sae_sources.load(cfg.sae_setup, lm, layers, corpus, RunDir(cfg.run_dir))
    ids = corpus.ids[:3]
    target, english = (align.collate(lm.tokenizer, [(s, dict(corpus.sentences(lang))[s]) for s in ids], 48)
                       for lang in ("hi", "en"))
    torch.manual_seed(0)
    model = align.attach_lora(lm.model, cfg.align, lm.n_layers).eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    peft_lm = dataclasses.replace(lm, model=model)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for summarise in (True, False):
        objective = align.Objective(peft_lm, saes, {"hi": dict.fromkeys(layers, 1.0)}, cfg.align, summarise)
        assert objective.reference.linear is summarise
        losses = objective(model, target, english, "hi")
        results.append((losses, torch.autograd.grad(losses["total"], params)))
    (summary, summary_grads), (recomputed, recomputed_grads) = results
    assert summary["keep"] > 1e-4
    for k in ("ce", "align", "keep", "total"):
        torch.testing.assert_close(summary[k], recomputed[k], rtol=1e-4, atol=1e-6)
    for s, r in zip(summary_grads, recomputed_grads, strict=True):  # float32 rounding of p W, relative to |g|
        assert (s - r).norm() <= 1e-3 * r.norm() + 1e-7, ((s - r).norm(), r.norm())
