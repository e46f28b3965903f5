"""The SAE-free controls and the SAE's error, stored by extraction, against a direct computation from the
model's hidden_states and sae-lens's own encode/decode; truncation counting."""

import numpy as np
import torch

from jobs.extract import extraction_of
from toolkit import corpus as corpora
from toolkit import saes as sae_sources
from toolkit.capture import count_truncated, iter_batches, tokenize
from toolkit.config import Config
from toolkit.extraction import encode_batch
from toolkit.rundir import RunDir


def test_controls_equal_a_direct_computation_from_hidden_states(tiny_lm):
    cfg = Config.build({"run": {"langs": "en,hi", "max_sentences": 10}, "sae": {"source": "random"}}, preset="tiny")
    corpus = corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)
    layers = [0, 7, 24]  # hidden_states[l + 1] is block l's output except the last block's (final norm)
    saes = sae_sources.load(cfg.sae_setup, tiny_lm, layers, corpus, RunDir(cfg.run_dir))
    batch = next(iter_batches(corpus.sentences("hi"), tiny_lm.tokenizer, 4096, cfg.extract.max_length))
    encoded = encode_batch(tiny_lm, saes, batch, layers, save_resid=False)
    with torch.inference_mode():
        hidden = tiny_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               output_hidden_states=True).hidden_states
    keep = batch.keep
    for layer in layers:
        sae, mean = saes.layers[layer].sae, saes.layers[layer].mean
        norms, ratios, errs, devs = [], [], [], []
        for row in range(len(batch.sentence_ids)):
            x = hidden[layer + 1][row][keep[row]].float()
            with torch.inference_mode():
                x_hat = sae.decode(sae.encode(x))
            err, dev = ((x - x_hat) ** 2).sum(1), ((x - mean) ** 2).sum(1)
            norms.append(x.norm(dim=1).mean())
            ratios.append((err / dev).mean())
            errs.append(err.sum())
            devs.append(dev.sum())
        got = encoded.layers[layer]
        np.testing.assert_allclose(got.resid_norm, torch.stack(norms).numpy(), rtol=1e-5)
        np.testing.assert_allclose(got.recon_err, torch.stack(ratios).numpy(), rtol=1e-4)
        np.testing.assert_allclose(got.sq_err, torch.stack(errs).numpy(), rtol=1e-4)
        np.testing.assert_allclose(got.sq_dev, torch.stack(devs).numpy(), rtol=1e-4)


def test_the_mean_of_an_sae_without_one_is_measured_on_held_out_sentences(tiny_lm):
    cfg = Config.build({"run": {"langs": "en,hi"}, "sae": {"source": "random"}}, preset="tiny")
    corpus = corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)
    saes = sae_sources.load(cfg.sae_setup, tiny_lm, [3], corpus, RunDir(cfg.run_dir))
    layer = saes.layers[3]
    assert layer.mean.shape == (tiny_lm.d_model,) and "held-out" in layer.mean_source


def test_truncated_sentences_are_counted(tiny_lm):
    texts = ["a short one", "a much longer sentence that the limit will certainly cut in the middle of it"]
    lengths = [len(t) for t in tokenize(tiny_lm.tokenizer, texts, 10_000)]
    limit = lengths[0] + 1
    assert count_truncated(tiny_lm.tokenizer, texts, limit) == 1
    assert count_truncated(tiny_lm.tokenizer, texts, max(lengths)) == 0
    assert max(len(t) for t in tokenize(tiny_lm.tokenizer, texts, limit)) == limit


def test_extraction_records_how_many_sentences_it_cut(tmp_path, tiny_lm):
    from toolkit import extraction
    from toolkit.store import ActivationFile

    cfg = Config.build({"run": {"run": str(tmp_path), "langs": "en,hi", "max_sentences": 8},
                        "sae": {"source": "random"}, "extract": {"max_length": 12}}, preset="tiny")
    corpus = corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)
    saes = sae_sources.load(cfg.sae_setup, tiny_lm, [0], corpus, RunDir(cfg.run_dir))
    summary = extraction.extract_unit(extraction_of(cfg), tiny_lm, saes, corpus, extraction.ExtractionUnit("hi"), [0])
    expected = count_truncated(tiny_lm.tokenizer, [t for _, t in corpus.sentences("hi")], 12)
    assert 0 < expected and summary.truncated == expected
    with ActivationFile(summary.path) as f:
        assert f.attrs["n_truncated"] == expected
