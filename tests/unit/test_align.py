"""Activation-aware LoRA alignment on the tiny preset: objective, split, weights, adapters, resume, engines."""

import contextlib
import json
import math
import multiprocessing
import os
import signal
import socket
import sys
import time
from pathlib import Path

import deepspeed.comm.comm as ds_comm
import numpy as np
import pytest
import torch

from jobs import align as align_job
from tests.unit.analysis_fixtures import write_activations
from toolkit import align, models, submit
from toolkit import corpus as corpora
from toolkit import saes as sae_sources
from toolkit.config import Config, ModelConfig, parse_layers
from toolkit.errors import UserError
from toolkit.store import ActivationFile

# Seconds per run: 40 sentences, byte-level tokens cut at 48, six SAE layers; `cfg_for` is the same in Python.
CLI_OPTS = {"langs": "hi,es", "targets": "hi", "sae": "random", "max-sentences": "40", "max-length": "48",
            "layers": "0-25:5", "steps": "6", "checkpoint-every": "2", "lr": "0.002", "align-layers": "0-25:5",
            "seed": "0"}


def cfg_for(run, **overrides) -> Config:
    values = {
        "run": {"run": str(run), "langs": "hi,es", "max_sentences": 40, "layers": "0-25:5", "seed": 0},
        "sae": {"source": "random"},
        "extract": {"max_length": 48},
        "align": {"targets": "hi", "steps": 6, "checkpoint_every": 2, "lr": 0.002, "align_layers": "0-25:5"},
    }
    for key, value in overrides.items():
        section, name = key.split(".")
        values.setdefault(section, {})[name] = value
    return Config.build(values, preset="tiny")


def cli(run) -> list[str]:
    """Arguments of `python -m toolkit.submit` for the reference configuration."""
    args = ["align", "--preset", "tiny", "--run", str(run)]
    for key, value in CLI_OPTS.items():
        args += [f"--{key}", value]
    return args


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted in-process run through the job (train + before/after)."""
    run = tmp_path_factory.mktemp("align_ref")
    cfg = cfg_for(run)
    summaries = align_job.run(cfg)
    return cfg, summaries, json.loads((run / "align" / "hi" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = cfg_for(tmp_path_factory.mktemp("align_tiny"))
    corpus = corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)
    lm = models.load(cfg.model)
    layers = parse_layers(cfg.align.align_layers, lm.n_layers)
    saes = sae_sources.load(cfg, lm, layers, corpus)
    split = align.split_ids(corpus.ids, cfg.align.heldout, cfg.align.val_fraction, cfg.run.seed)
    return cfg, lm, saes, corpus, split, layers


# ------------------------------------------------------------------------------------- pure functions


def test_split_is_seeded_disjoint_and_complete():
    ids = [f"s{i:03d}" for i in range(100)]
    split = align.split_ids(ids, 0.2, 0.1, seed=0)
    assert (len(split.heldout), len(split.val), len(split.train)) == (20, 8, 72)
    assert not set(split.train) & set(split.val) and not set(split.train) & set(split.heldout)
    assert not set(split.val) & set(split.heldout)
    assert sorted(split.train + split.val + split.heldout) == ids
    assert align.split_ids(ids, 0.2, 0.1, seed=0) == split
    assert align.split_ids(ids, 0.2, 0.1, seed=1).heldout != split.heldout
    assert split.train == sorted(split.train)  # corpus order kept
    with pytest.raises(UserError, match="no training sentences"):
        align.split_ids([], 0.5, 0.5, 0)
    assert align.split_ids(["a", "b"], 0.5, 0.5, 0).train  # small corpora keep a training sentence


def test_batches_are_a_pure_function_of_the_index_and_cover_each_epoch():
    ids = [f"s{i}" for i in range(10)]
    epoch = [sid for k in range(5) for sid in align.batch_ids(ids, k, 2, seed=3, salt="hi")]
    assert sorted(epoch) == ids
    assert align.batch_ids(ids, 7, 4, 3, "hi") == align.batch_ids(ids, 7, 4, 3, "hi")
    assert epoch != [sid for k in range(5) for sid in align.batch_ids(ids, k, 2, seed=4, salt="hi")]


def test_weights_follow_the_gap_with_mean_one():
    w = align.weights_from_gaps({0: -30.0, 1: -10.0, 2: 5.0, 3: math.nan}, [0, 1, 2, 3])
    assert w[0] == pytest.approx(3 * w[1]) and w[2] == 0 and w[3] == 0
    assert np.mean(list(w.values())) == pytest.approx(1.0)
    assert align.weights_from_gaps({0: 4.0, 1: 2.0}, [0, 1]) == {0: 1.0, 1: 1.0}  # never weaker: uniform
    assert align.weights_from_gaps({0: -4.0, 1: -2.0}, [0, 1], "uniform") == {0: 1.0, 1: 1.0}
    assert align.weights_from_gaps(None, [5]) == {5: 1.0}


def test_gaps_from_the_report_csv(tmp_path):
    path = tmp_path / "gaps.csv"
    rows = ["language,layer,statistic,value,ci_low,ci_high,gap_pct,gap_parallel_pct,p_value,n"]
    rows += [f"hi,{layer},mass,1,1,1,{-10 * layer},0,0.5,9" for layer in range(3)]
    rows += ["hi,0,l0,1,1,1,-99,0,0.5,9", "en,0,mass,1,1,1,,,,9"]
    path.write_text("\n".join(rows) + "\n")
    assert align.gaps_from_csv(path, "hi", [0, 1, 2]) == {0: 0.0, 1: -10.0, 2: -20.0}
    assert align.gaps_from_csv(path, "hi", [0, 5]) is None
    assert align.gaps_from_csv(tmp_path / "missing.csv", "hi", [0]) is None


def test_gaps_from_activation_files_use_the_shared_ids(tmp_path):
    ids = ["a", "b", "c", "d"]
    en = np.array([[2.0, 4.0]] * 4)
    hi = np.array([[1.0, 4.0], [1.0, 4.0], [1.0, 2.0], [100.0, 100.0]])
    write_activations(tmp_path / "activations" / "en.h5", "en", ids, en, layers=[0, 1])
    write_activations(tmp_path / "activations" / "hi.h5", "hi", ids, hi, layers=[0, 1])
    gaps = align.gaps_from_activations(tmp_path, "hi", [0, 1], ids=["a", "b", "c"])
    assert gaps[0] == pytest.approx(-50.0) and gaps[1] == pytest.approx(100 * (10 / 3 - 4) / 4)
    assert align.gaps_from_activations(tmp_path, "hi", [0, 7]) is None
    assert align.gaps_from_activations(tmp_path, "ml", [0]) is None


def test_targets_and_units():
    cfg = Config.build({"run": {"langs": "hi,ml,es"}}, preset="tiny")
    assert [u.name for u in align_job.units(cfg)] == ["es", "ml", "hi"]
    assert [u.name for u in align_job.units(cfg, ["ml"])] == ["ml"]
    joint = Config.build({"run": {"langs": "hi,ml"}, "align": {"joint": True}}, preset="tiny")
    assert [(u.name, u.targets) for u in align_job.units(joint)] == [("joint", ["ml", "hi"])]
    with pytest.raises(UserError, match="not among"):
        align_job.units(cfg, ["mr"])
    with pytest.raises(UserError, match="reference"):
        align_job.units(Config.build({"run": {"langs": "hi"}, "align": {"targets": "en"}}, preset="tiny"))


# ------------------------------------------------------------------------------------------- training


def test_loss_falls_and_every_term_is_finite(reference):
    cfg, summaries, metrics = reference
    steps = metrics["steps"]
    assert [s["step"] for s in steps] == list(range(1, cfg.align.steps + 1))
    for record in steps + metrics["validation"]:
        assert all(math.isfinite(record[k]) for k in align.TERMS), record
    assert steps[0]["keep"] == pytest.approx(0.0, abs=1e-6)  # LoRA starts as the base model
    assert np.mean([s["total"] for s in steps[-2:]]) < np.mean([s["total"] for s in steps[:2]])
    assert steps[-1]["align"] < steps[0]["align"]
    assert [v["step"] for v in metrics["validation"]] == [2, 4, 6]
    assert metrics["complete"] and metrics["split"]["heldout"] == 8 and metrics["resumed_from"] == []
    assert set(metrics["weights"]["hi"]) == {"0", "5", "10", "15", "20", "25"}
    assert np.mean(list(metrics["weights"]["hi"].values())) == pytest.approx(1.0)
    assert len(set(metrics["rank_digests"])) == 1


def test_before_after_report(reference):
    cfg, summaries, _ = reference
    report = json.loads((cfg.run_dir / "align" / "hi" / "before_after.json").read_text())
    assert {lang: v["role"] for lang, v in report["languages"].items()} == {
        "en": "reference", "es": "other", "hi": "target"}
    for v in report["languages"].values():
        assert set(v["gain_pct"]) == {"0", "5", "10", "15", "20", "25"}
        assert all(math.isfinite(x) for x in [*v["gain_pct"].values(), v["ppl_before"], v["ppl_after"]])
        assert v["retention_pct_mean"] == pytest.approx(100 + v["gain_pct_mean"])
        pooled = 100 * (sum(v["A_after"].values()) / sum(v["A_before"].values()) - 1)
        assert v["gain_pct_pooled"] == pytest.approx(pooled)
        assert v["gain_pct_median"] == pytest.approx(np.median(list(v["gain_pct"].values())))
    assert report["english_retention_pct"] == report["languages"]["en"]["retention_pct_mean"]
    assert report["heldout_sentences"] == 8
    assert summaries[0]["gain_pct"]["hi"] == report["languages"]["hi"]["gain_pct_mean"]
    # the held-out sentences were measured, and never trained on
    ids = set(align.split_ids(corpora.load(cfg.run.corpus, cfg.lang_codes, 40).ids, 0.2, 0.1, 0).heldout)
    with ActivationFile(cfg.run_dir / "align" / "hi" / "after" / "activations" / "hi.h5") as f:
        assert set(f.sentence_ids) == ids and "adapter" in f.attrs["model_id"]


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
        peft_lm = models.LoadedModel(model, lm.tokenizer, lm.model_id, lm.revision, lm.device, lm.dtype)
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


def test_adapter_round_trips_with_identical_outputs(tiny, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    cfg, lm, saes, corpus, split, layers = tiny
    weights = {"hi": align.weights_from_gaps(None, layers)}
    result = align.train(cfg.merged({"align": {"steps": 2}}), lm, saes, corpus, ["hi"], split, weights,
                         tmp_path / "hi")
    try:
        batch = align.collate(lm.tokenizer, corpus.sentences("hi")[:3], 48)
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        with torch.no_grad():
            trained = result.model.eval()(**inputs).logits
            saved = load_file(str(result.adapter / "adapter_model.safetensors"))
            assert saved.keys() == result.state.keys()
            assert all(torch.equal(saved[k], v) for k, v in result.state.items())
            assert all(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
            fresh = models.load(cfg.model)
            reloaded = PeftModel.from_pretrained(fresh.model, str(result.adapter)).eval()(**inputs).logits
            merged = models.load(ModelConfig(name="tiny", adapter=str(result.adapter))).model(**inputs).logits
            base = models.load(ModelConfig(name="tiny")).model(**inputs).logits
        assert torch.equal(trained, reloaded)
        torch.testing.assert_close(merged, trained, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(base, trained)
    finally:
        lm.model = result.model.unload()


def _forked(target, *args):
    """A child process that inherits the imported modules: the CLI's startup costs ~8 s of imports."""
    proc = multiprocessing.get_context("fork").Process(target=target, args=args)
    proc.start()
    return proc


def _cli_main(argv: list[str]) -> None:
    sys.exit(submit.main(argv))


def test_resume_after_sigkill_matches_an_uninterrupted_run(reference, tmp_path):
    _, _, ref_metrics = reference
    proc = _forked(_cli_main, cli(tmp_path))
    first = tmp_path / "align" / "hi" / "checkpoints" / "step-000002" / "state.json"
    deadline = time.monotonic() + 120
    while not first.is_file() and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert first.is_file(), f"no checkpoint appeared (exit code {proc.exitcode})"
    assert proc.exitcode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "align" / "hi" / "adapter").exists()
    assert submit.main(cli(tmp_path)) == 0
    metrics = json.loads((tmp_path / "align" / "hi" / "metrics.json").read_text())
    assert metrics["step"] == ref_metrics["step"] == 6 and metrics["resumed_from"]
    assert [s["total"] for s in metrics["steps"]] == [s["total"] for s in ref_metrics["steps"]]
    assert metrics["final"] == ref_metrics["final"]
    assert metrics["validation"] == ref_metrics["validation"]
    assert metrics["adapter_sha256"] == ref_metrics["adapter_sha256"]
    assert (tmp_path / "align" / "hi" / "before_after.json").is_file()


def test_deepspeed_on_cpu_runs_two_steps_without_compiling_ops(tiny, tmp_path):
    cfg, lm, saes, corpus, split, layers = tiny
    saved_env = dict(os.environ)
    result = None
    try:
        started = time.perf_counter()
        dist = align.setup_distributed("deepspeed", "cpu")
        assert ds_comm.cdb.shm_comm_op is None  # the shared-memory op DeepSpeed would JIT-compile for minutes
        result = align.train(cfg.merged({"align": {"steps": 2, "grad_accum": 2}}), lm, saes, corpus, ["hi"], split,
                             {"hi": align.weights_from_gaps(None, layers)}, tmp_path / "hi", dist, "deepspeed")
        seconds = time.perf_counter() - started
        print(f"DeepSpeed CPU: init + 2 steps (x2 accumulation) in {seconds:.1f} s")
        assert result.metrics["engine"] == "deepspeed" and len(result.metrics["steps"]) == 2
        assert all(math.isfinite(s["total"]) for s in result.metrics["steps"])
        assert any(v.abs().sum() > 0 for k, v in result.state.items() if "lora_B" in k)
        state = tmp_path / "hi" / "checkpoints" / "step-000002" / "deepspeed" / "state"
        assert (state / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    finally:
        if result is not None:
            lm.model = result.model.unload()
        if torch.distributed.is_initialized():  # leave no process group (or DeepSpeed's cached groups) behind
            ds_comm.destroy_process_group()
        ds_comm.cdb = None
        os.environ.clear()
        os.environ.update(saved_env)


def _rank(rank: int, port: int, out: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    cfg = cfg_for(out, **{"align.engine": "deepspeed", "align.steps": 2, "align.zero_stage": 1})
    dist = align.setup_distributed("deepspeed", "cpu")
    corpus = corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)
    lm = models.load(cfg.model)
    layers = parse_layers(cfg.align.align_layers, lm.n_layers)
    saes = sae_sources.load(cfg, lm, layers, corpus)
    split = align.split_ids(corpus.ids, 0.2, 0.1, 0)
    result = align.train(cfg, lm, saes, corpus, ["hi"], split, {"hi": align.weights_from_gaps(None, layers)},
                         out / "hi", dist, "deepspeed")
    torch.save(align.trainable_state(result.model), out / f"rank{dist.rank}.pt")


def test_two_process_data_parallel_ranks_agree(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_forked(_rank, rank, port, tmp_path) for rank in range(2)]
    for proc in procs:
        proc.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(v.abs().sum() > 0 for k, v in states[0].items() if "lora_B" in k)
    metrics = json.loads((tmp_path / "hi" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(set(metrics["rank_digests"])) == 1 and len(metrics["rank_digests"]) == 2
