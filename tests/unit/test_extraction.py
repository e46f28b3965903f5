"""toolkit.extraction on the tiny model: the file layout of three languages, statistics that equal those
recomputed from the codes, progress through a callback, skipping finished units, shards."""

import json
from contextlib import contextmanager

import numpy as np
import pytest

from jobs.extract import extraction_of
from toolkit import corpus as corpora
from toolkit import extraction, models
from toolkit import saes as sae_sources
from toolkit.config import Config, parse_layers
from toolkit.rundir import RunDir
from toolkit.store import ActivationFile, activation_files


def tiny_cfg(run, **run_opts) -> Config:
    values = {"run": {"run": str(run), "langs": "en,hi,ml", "max_sentences": 12, **run_opts}}
    return Config.build(values, preset="tiny")


class Recorder:
    """A progress factory that records what extraction reports."""

    def __init__(self):
        self.calls: dict[str, dict] = {}

    @contextmanager
    def __call__(self, lang: str, total: int, completed: int):
        seen = self.calls[lang] = {"total": total, "completed": completed, "advanced": 0, "rates": []}

        def advance(sentences: int, rate: float) -> None:
            seen["advanced"] += sentences
            seen["rates"].append(rate)

        yield advance


def open_run(cfg: Config):
    corpus = corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)
    lm = models.load(cfg.model)
    layers = parse_layers(cfg.run.layers, lm.n_layers)
    saes = sae_sources.load(cfg.sae_setup, lm, layers, corpus, RunDir(cfg.run_dir))
    saes.own_memory()
    return lm, saes, corpus, layers


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = tiny_cfg(tmp_path_factory.mktemp("tiny_run"), layers="0-3,25")
    lm, saes, corpus, layers = opened = open_run(cfg)
    recorder = Recorder()
    summaries = [extraction.extract_unit(extraction_of(cfg), lm, saes, corpus, unit, layers, recorder)
                 for unit in extraction.all_units(cfg.lang_codes, cfg.extract.shards)]
    return cfg, summaries, recorder, opened


def test_layout_of_three_languages(tiny_run, tiny_lm):
    cfg, summaries, _, _ = tiny_run
    files = activation_files(cfg.run_dir)
    assert sorted(files) == ["en", "hi", "ml"]
    from toolkit.corpus import load

    corpus = load(cfg.run.corpus, ["en", "hi", "ml"], 12)
    for lang, (path,) in files.items():
        with ActivationFile(path) as f:
            a = f.attrs
            assert a["layout_version"] == 2 and a["complete"] and a["language"] == lang
            assert f.layers == [0, 1, 2, 3, 25] and a["hook_point"] == "blocks.{layer}.hook_resid_post"
            assert a["model_id"] == "tiny-gemma2-random" and a["sae_source"].startswith("local:")
            assert len(a["sae_ids"]) == 5 and a["corpus_hash"] == corpus.lang_hash(lang)
            assert json.loads(a["sae_recipe"])["train_mix"] == cfg.sae.train_mix
            assert sorted(f.sentence_ids) == sorted(corpus.ids)
            offsets, tokens = f.token_offsets, f.token_ids
            assert offsets[0] == 0 and offsets[-1] == len(tokens) == a["n_tokens"]
            # every stored row traces back to the corpus: the sentence's tokens minus BOS
            texts = dict(corpus.sentences(lang))
            for k, sid in enumerate(f.sentence_ids):
                expected = tiny_lm.tokenizer(texts[sid])["input_ids"][: cfg.extract.max_length]
                assert expected[0] == tiny_lm.tokenizer.bos_token_id
                assert tokens[offsets[k]:offsets[k + 1]].tolist() == expected[1:]
            assert tiny_lm.tokenizer.pad_token_id not in tokens.tolist()
            for layer in f.layers:
                indptr, indices, values = f.codes(layer)
                assert len(indptr) == len(tokens) + 1 and indptr[-1] == len(indices) == len(values)
                assert values.min() > 0 and indices.max() < 128
                assert f._h5[f"layers/{layer}/codes/values"].dtype == np.float16
                assert np.isfinite(f._h5[f"layers/{layer}"].attrs["fve"])
    assert {s.lang for s in summaries} == {"en", "hi", "ml"}


def test_stored_statistics_equal_those_recomputed_from_the_codes(tiny_run):
    cfg, *_ = tiny_run
    with ActivationFile(activation_files(cfg.run_dir)["hi"][0]) as f:
        offsets = f.token_offsets
        for layer in f.layers:
            indptr, _, values = f.codes(layer)
            token_mass = np.add.reduceat(values, indptr[:-1]) * (np.diff(indptr) > 0)
            token_l0 = np.diff(indptr)
            for stat, per_token, reduce in (("mass", token_mass, np.mean), ("l0", token_l0, np.mean)):
                recomputed = [reduce(per_token[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
                np.testing.assert_allclose(f.stats(layer, stat), recomputed, rtol=2e-3, atol=1e-3)
            peaks = [values[indptr[a]:indptr[b]].max() for a, b in zip(offsets[:-1], offsets[1:])]
            np.testing.assert_allclose(f.stats(layer, "max"), peaks, rtol=1e-3)



def test_progress_reports_every_sentence_through_the_callback(tiny_run):
    _, summaries, recorder, _ = tiny_run
    assert set(recorder.calls) == {"en", "hi", "ml"}
    for s in summaries:
        seen = recorder.calls[s.lang]
        assert seen["completed"] == 0 and seen["total"] == seen["advanced"] == s.sentences == 12
        assert all(rate > 0 for rate in seen["rates"]) and not s.skipped


def test_a_finished_unit_is_skipped_without_progress(tiny_run):
    cfg, _, _, (lm, saes, corpus, layers) = tiny_run
    recorder = Recorder()
    job = extraction_of(cfg)
    summary = extraction.extract_unit(job, lm, saes, corpus, extraction.ExtractionUnit("hi"), layers, recorder)
    assert summary.skipped and summary.sentences == 12 and recorder.calls == {}


def test_identity_names_what_defines_the_content(tiny_run):
    cfg, summaries, _, (lm, saes, corpus, layers) = tiny_run
    ident = extraction.identity(extraction_of(cfg), lm, saes, corpus, extraction.ExtractionUnit("ml", 1, 3), layers)
    assert ident["language"] == "ml" and (ident["shard"], ident["n_shards"]) == (1, 3)
    assert ident["layers"] == [0, 1, 2, 3, 25] and ident["hook_point"] == "blocks.{layer}.hook_resid_post"
    with ActivationFile(summaries[0].path) as f:
        unit = extraction.ExtractionUnit(f.language)
        assert f.identity == extraction.identity(extraction_of(cfg), lm, saes, corpus, unit, layers)


def test_the_set_carries_its_folder_and_recipe_into_every_shard(tiny_run, tmp_path):
    cfg, _, _, (lm, saes, corpus, layers) = tiny_run
    root = RunDir(cfg.run_dir).sae_set(saes.source.removeprefix("local:"))
    assert saes.root == root and saes.recipe == (root / "training.json").read_text() != ""
    job = extraction.Extraction(cfg.extract, tmp_path / "activations", cfg.run.preset)  # outside the run folder
    for k in range(2):
        summary = extraction.extract_unit(job, lm, saes, corpus, extraction.ExtractionUnit("hi", k, 2), layers)
        assert summary.path == tmp_path / "activations" / f"hi.shard{k:03d}-of-002.h5"
        with ActivationFile(summary.path) as f:
            assert f.attrs["sae_recipe"] == saes.recipe


def test_shards_are_contiguous_blocks_in_corpus_order():
    ids = [f"s{k}" for k in range(10)]
    blocks = [extraction.shard_ids(ids, k, 3) for k in range(3)]
    assert sum(blocks, []) == ids and [len(b) for b in blocks] == [3, 4, 3]
    assert extraction.shard_ids(ids, 0, 1) == ids


def test_all_units_cover_every_language_and_shard(tmp_path):
    cfg = tiny_cfg(tmp_path)
    cfg.extract.shards = 2
    units = extraction.all_units(cfg.lang_codes, cfg.extract.shards)
    assert [(u.lang, u.shard, u.n_shards) for u in units] == [(lang, k, 2) for lang in cfg.lang_codes for k in (0, 1)]


@pytest.mark.skipif(__import__("sys").platform != "linux", reason="glibc's mallopt")
def test_mmap_threshold_is_fixed_on_glibc():
    assert extraction.fixed_mmap_threshold() is True


@pytest.mark.skipif(__import__("sys").platform != "linux", reason="glibc's mallopt")
def test_tensors_below_the_mmap_threshold_reuse_the_heap_instead_of_faulting_in_fresh_pages():
    """An SAE training step allocates and frees a few MiB each time; a heap trimmed after every free faulted
    every page of them in again (460k faults per trained layer)."""
    import subprocess
    import sys

    code = """
import resource, torch
from toolkit.extraction import fixed_mmap_threshold
assert fixed_mmap_threshold()
x, w = torch.randn(128, 640), torch.randn(640, 1024)
def steps():
    for _ in range(100):
        x.T @ (x @ w)  # 0.5 and 2.5 MiB, as a training step's activations and weight gradient
steps()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
steps()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert int(out.stdout.split()[-1]) < 1000  # a heap trimmed after each free: ~30,000
