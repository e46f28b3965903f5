"""The alignment step benchmark's mechanics on the tiny preset (timings are the script's business, not tested)."""

import pytest
import torch

from benchmarks.align_step import align_step_ratio
from toolkit import corpus as corpora
from toolkit import models
from toolkit import saes as sae_sources
from toolkit.config import Config, parse_layers
from toolkit.rundir import RunDir


def test_align_step_ratio_times_both_steps_and_leaves_the_base_model(tmp_path):
    cfg = Config.build({"run": {"run": str(tmp_path), "langs": "hi", "max_sentences": 20, "seed": 0},
                        "sae": {"source": "random"}, "extract": {"max_length": 32},
                        "align": {"batch_size": 4, "align_layers": "0-25:5"}}, preset="tiny")
    corpus = corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)
    lm = models.load(cfg.model)
    layers = parse_layers(cfg.align.align_layers, lm.n_layers)
    saes = sae_sources.load(cfg.sae_setup, lm, layers, corpus, RunDir(cfg.run_dir))
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    r = align_step_ratio(cfg, lm, saes, corpus, "hi", repeats=1)
    assert {"align_step_s", "lm_step_s", "align_step_ratio", "batch_size", "tokens", "align_layers",
            "reference_s", "align_step_cold_ratio"} <= set(r)
    assert r["align_step_s"] > 0 and r["lm_step_s"] > 0 and r["reference_s"] > 0
    assert r["align_step_ratio"] == pytest.approx(r["align_step_s"] / r["lm_step_s"])
    assert r["align_step_cold_ratio"] == pytest.approx((r["align_step_s"] + r["reference_s"]) / r["lm_step_s"])
    assert r["batch_size"] == 4 and r["align_layers"] == layers
    assert r["tokens"]["target"] > 0 and r["tokens"]["english"] > 0
    assert r["tokens"]["padded"] >= r["tokens"]["target"] + r["tokens"]["english"]
    state = lm.model.state_dict()  # the LoRA is gone again and the base weights are untouched
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)
