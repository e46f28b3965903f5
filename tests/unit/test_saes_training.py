"""Local SAE training on the tiny model: architectures, the saved form extraction reads, mixes, budgets, resume."""

import json

import numpy as np
import pytest
import torch
from rich.console import Console

from toolkit import corpus as corpora
from toolkit import sae_set, sae_training, saes
from toolkit.capture import ResidualCapture, iter_batches
from toolkit.config import QUICK_L0, STANDARD_L0, STANDARD_WIDTH, Config
from toolkit.rundir import RunDir

QUIET = Console(quiet=True)


def tiny_cfg(run, layers: str = "1,2", **sae) -> Config:
    values = {"run": {"run": str(run), "langs": "en,hi,zh", "max_sentences": 30, "layers": layers},
              "sae": {"train_tokens": 3000, **sae}}
    return Config.build(values, preset="tiny")


def corpus_of(cfg: Config):
    return corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)


def residuals(lm, corpus, layer: int) -> torch.Tensor:
    got = []
    with torch.inference_mode(), ResidualCapture(lm, [layer], lambda _, h: got.append(h[keep[0]])) as cap:
        for batch in iter_batches(corpus.sentences("hi")[:8], lm.tokenizer, 1024, 64):
            keep = [batch.keep]
            cap.run(batch)
    return torch.cat(got)


@pytest.mark.parametrize("arch", ["jumprelu", "batchtopk"])
def test_trained_sae_loads_as_jumprelu_and_sparse_encode_equals_saelens(arch, tmp_path, tiny_lm):
    from sae_lens import JumpReLUSAE

    cfg = tiny_cfg(tmp_path, arch=arch, target_l0=8)
    corpus = corpus_of(cfg)
    trained = sae_training.train(cfg.sae_setup, tiny_lm, [1], corpus, RunDir(cfg.run_dir), QUIET)
    layer = trained.layers[1]
    assert type(layer.sae) is JumpReLUSAE and sae_set.plain_threshold(layer.sae) is not None
    x = residuals(tiny_lm, corpus, 1)
    with torch.no_grad():
        dense = layer.sae.encode(x)
        rows, cols, values = layer.encode_sparse(x)
    want_rows, want_cols = dense.nonzero(as_tuple=True)
    assert len(rows) > 0 and torch.equal(rows, want_rows) and torch.equal(cols, want_cols)
    torch.testing.assert_close(values, dense[want_rows, want_cols])
    again = sae_set.from_dir(tmp_path / "saes" / trained.source.removeprefix("local:"), [1], tiny_lm)
    assert torch.equal(again.layers[1].sae.threshold, layer.sae.threshold)


def test_saved_layer_carries_its_training_mean_and_metadata(tmp_path, tiny_lm):
    cfg = tiny_cfg(tmp_path, train_mix="balanced")
    trained = sae_training.train(cfg.sae_setup, tiny_lm, [1, 2], corpus_of(cfg), RunDir(cfg.run_dir), QUIET)
    folder = tmp_path / "saes" / trained.source.removeprefix("local:") / "layer_2"
    mean = np.load(folder / "mean.npy", allow_pickle=False)
    assert mean.dtype == np.float32 and mean.shape == (tiny_lm.d_model,)
    assert torch.equal(trained.layers[2].mean.cpu(), torch.from_numpy(mean))
    meta = json.loads((folder / "lingogap.json").read_text())
    assert meta["train_mix"] == "balanced" and meta["arch"] == cfg.sae.arch == "batchtopk"
    assert set(meta["train_tokens_per_language"]) == {"en", "hi", "zh"}
    assert np.isfinite(meta["fve"])


def test_the_mix_changes_the_tokens_per_language_as_stated(tiny_lm):
    corpus = corpora.load("embedded", ["en", "hi", "zh", "ml"], 60)
    budget = 2000

    def counts(mix: str) -> dict[str, int]:
        sample = sae_training.training_sample(corpus, mix, tiny_lm.tokenizer, budget, 128)
        return sae_training.tokens_per_language(sample, budget)

    english, balanced, as_comes = counts("english"), counts("balanced"), counts("corpus")
    assert english == {"en": budget}
    assert sum(balanced.values()) == budget and set(balanced) == {"en", "hi", "zh", "ml"}
    longest = 128
    assert max(balanced.values()) - min(balanced.values()) <= 2 * longest
    # as the corpus comes, sentence by sentence: a script that takes more tokens per sentence takes more
    assert sum(as_comes.values()) == budget and as_comes["ml"] > as_comes["zh"]
    assert max(as_comes.values()) - min(as_comes.values()) > max(balanced.values()) - min(balanced.values())
    # a budget larger than the corpus: balanced stops at what the language with the fewest tokens has
    everything = sae_training.training_sample(corpus, "balanced", tiny_lm.tokenizer, 10**9, 128)
    per_lang = sae_training.tokens_per_language(everything, 10**9)
    assert max(per_lang.values()) - min(per_lang.values()) <= longest


def test_the_mix_and_arch_key_different_sets(tmp_path, tiny_lm):
    corpus = corpus_of(tiny_cfg(tmp_path))
    keys = {sae_training.training_key(tiny_cfg(tmp_path, **opts).sae_setup, tiny_lm, corpus)
            for opts in ({}, {"train_mix": "english"}, {"arch": "jumprelu"}, {"budget": "standard"})}
    assert len(keys) == 4


def test_a_killed_training_resumes_at_the_first_unfinished_layer(tmp_path, tiny_lm):
    cfg = tiny_cfg(tmp_path)
    corpus = corpus_of(cfg)
    first = sae_training.train(cfg.sae_setup, tiny_lm, [1], corpus, RunDir(cfg.run_dir), QUIET)
    root = tmp_path / "saes" / first.source.removeprefix("local:")
    weights = (root / "layer_1" / "sae_weights.safetensors").read_bytes()
    (root / ".layer_2.999999999.tmp").mkdir()  # what a kill during the save of layer 2 leaves (a dead pid)
    both = sae_training.train(cfg.sae_setup, tiny_lm, [1, 2], corpus, RunDir(cfg.run_dir), QUIET)
    assert (root / "layer_1" / "sae_weights.safetensors").read_bytes() == weights
    assert (root / "layer_2" / "cfg.json").is_file() and not (root / ".layer_2.999999999.tmp").exists()
    assert both.source == first.source


def test_standard_budget_takes_every_token_and_a_wider_sae(tmp_path):
    quick = sae_training.sizes(tiny_cfg(tmp_path).sae, 10_000)
    standard = sae_training.sizes(tiny_cfg(tmp_path, budget="standard").sae, 10_000)
    assert (quick.distinct, quick.samples) == (3000, 3000)
    assert standard.distinct == 10_000 and standard.samples == sae_training.STANDARD_PASSES * 10_000
    assert standard.width == STANDARD_WIDTH


def test_target_l0_defaults_to_the_budgets_and_an_explicit_one_wins(tmp_path, tiny_lm):
    corpus = corpus_of(tiny_cfg(tmp_path))

    def l0(**sae) -> float:
        return sae_training.recipe(tiny_cfg(tmp_path, **sae).sae_setup, tiny_lm, corpus)["target_l0"]

    assert l0() == QUICK_L0 and l0(budget="standard") == STANDARD_L0
    assert l0(budget="standard", target_l0=16) == 16
    assert l0(target_l0=QUICK_L0) == l0()  # the same recipe keys the same set


def test_a_named_training_corpus_is_read_whole_and_the_runs_is_limited(tmp_path):
    cfg = tiny_cfg(tmp_path)
    run_corpus = corpus_of(cfg)
    assert saes.training_corpus(cfg.sae, run_corpus) is run_corpus
    named = saes.training_corpus(tiny_cfg(tmp_path, train_corpus=cfg.run.corpus).sae, run_corpus)
    assert len(run_corpus.ids) == 30 and len(named.ids) > 30  # --max-sentences limits only the run's corpus
    assert named.ids[:30] == run_corpus.ids  # held-out ids are the same sentences in both


def saved_weights(root, layers) -> dict:
    from safetensors.torch import load_file

    return {i: load_file(str(root / f"layer_{i}" / "sae_weights.safetensors")) for i in layers}


def test_layers_trained_two_at_a_time_equal_one_at_a_time_and_log_in_layer_order(tmp_path, tiny_lm, monkeypatch):
    trained = {}
    for workers in (1, 2):
        monkeypatch.setattr(sae_training, "training_workers", lambda device, n, workers=workers: min(workers, n))
        cfg = tiny_cfg(tmp_path / f"w{workers}", layers="0-5")
        log = Console(record=True, width=200, force_terminal=False)
        saes_ = sae_training.train(cfg.sae_setup, tiny_lm, list(range(6)), corpus_of(cfg),
                                   RunDir(cfg.run_dir), log)
        trained[workers] = saved_weights(saes_.root, range(6))
        lines = log.export_text().splitlines()
        assert [line.split(":")[0] for line in lines if line.startswith("SAE layer ")] == [
            f"SAE layer {i}" for i in range(6)]
        assert f"{workers} at a time" in " ".join(lines)
    for layer in range(6):
        for name, tensor in trained[1][layer].items():
            assert torch.equal(tensor, trained[2][layer][name]), (layer, name)


def test_the_shared_forward_pass_serves_training_and_quality_and_leaves_extraction_byte_equal(tmp_path, tiny_lm):
    """Extraction from the kept pass equals extraction from its own forward passes, bit for bit; the training
    sample gathered from it has the tokens a forward pass of its own grouping gives, in the same order."""
    from tests.helpers import h5_datasets
    from toolkit.capture import shared_forward
    from toolkit.extraction import Extraction, ExtractionUnit, extract_unit, unit_batches

    cfg = tiny_cfg(tmp_path / "a", layers="0-3", source="random")
    corpus = corpus_of(cfg)
    layers = [0, 1, 2, 3]
    fixed = saes.load(cfg.sae_setup, tiny_lm, layers, corpus, RunDir(cfg.run_dir), QUIET)  # only the pass differs
    units = [ExtractionUnit(lang) for lang in corpus.langs]
    sentences = [(s, t) for lang in corpus.langs for s, t in corpus.sentences(lang)][::3]
    plain = sae_training.collect_activations(tiny_lm, layers, sentences, 1500, 512, 64)
    files = {}
    for name, share in (("plain", False), ("shared", True)):
        job = Extraction(cfg.extract, tmp_path / name, cfg.run.preset)
        plan = lambda job=job: [b for u in units for b in unit_batches(job, tiny_lm, corpus, u)]  # noqa: E731
        with shared_forward(tiny_lm, layers, plan, 2**30) as shared:
            if share:
                assert shared.prepare() and shared.ready
                served = sae_training.collect_activations(tiny_lm, layers, sentences, 1500, 512, 64)
                for layer in layers:
                    assert served[layer].shape == plain[layer].shape == (1500, tiny_lm.d_model)
                    torch.testing.assert_close(served[layer], plain[layer], rtol=1e-4, atol=1e-4)
            for unit in units:
                extract_unit(job, tiny_lm, fixed, corpus, unit, layers)
            assert shared.entries == {}  # every extraction batch came from the kept pass, each taken once
        files[name] = {u.lang: h5_datasets(job.path(u)) for u in units}
    assert files["plain"].keys() == files["shared"].keys()
    for lang, datasets in files["plain"].items():
        assert datasets.keys() == files["shared"][lang].keys()
        for key, value in datasets.items():
            other = files["shared"][lang][key]
            same = value.tolist() == other.tolist() if value.dtype == object else value.tobytes() == other.tobytes()
            assert same, (lang, key)


def test_a_pass_over_the_memory_budget_is_not_kept_and_one_without_the_training_sample_is_not_used_for_it(
    tmp_path, tiny_lm
):
    from toolkit.capture import shared_forward
    from toolkit.extraction import Extraction, ExtractionUnit, unit_batches

    cfg = tiny_cfg(tmp_path, layers="0-1")
    corpus = corpus_of(cfg)
    job = Extraction(cfg.extract, tmp_path / "x", cfg.run.preset)
    hindi = lambda: unit_batches(job, tiny_lm, corpus, ExtractionUnit("hi"))  # noqa: E731
    with shared_forward(tiny_lm, [0, 1], hindi, 1024) as shared:
        assert not shared.prepare() and shared.entries == {}
        got = sae_training.collect_activations(tiny_lm, [0], corpus.sentences("hi")[:4], 50, 512, 64)
        assert got[0].shape == (50, tiny_lm.d_model)
    with shared_forward(tiny_lm, [0, 1], hindi, 2**30) as shared:
        assert shared.prepare()
        assert shared.holds(corpus.texts["hi"][:5], cfg.extract.max_length)  # training from it: gathered
        assert not shared.holds(corpus.texts["hi"][:5] + corpus.texts["zh"][:1], cfg.extract.max_length)
