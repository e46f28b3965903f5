"""Extraction on the tiny preset: hook points, layout, statistics, resume after SIGKILL, refusals."""

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from jobs import extract
from tests.conftest import ROOT
from toolkit import saes
from toolkit.capture import ResidualCapture, iter_batches, plan_batches
from toolkit.config import Config
from toolkit.errors import UserError
from toolkit.store import ActivationFile, StoreError, activation_files


def tiny_cfg(run, **run_opts) -> Config:
    values = {"run": {"run": str(run), "langs": "en,hi,ml", "max_sentences": 12, **run_opts}}
    return Config.build(values, preset="tiny")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tiny_run")
    cfg = tiny_cfg(run, layers="0-3,25")
    summaries = extract.run(cfg)
    return cfg, summaries


def test_hooks_equal_hidden_states_except_the_final_norm(tiny_lm):
    batch = next(iter_batches([("a", "Hello there."), ("b", "नमस्ते दुनिया")], tiny_lm.tokenizer, 512, 64))
    captured = {}
    layers = list(range(tiny_lm.n_layers))
    with torch.inference_mode():
        out = tiny_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        with ResidualCapture(tiny_lm, layers, lambda i, h: captured.__setitem__(i, h.clone())) as cap:
            cap.run(batch)
    for i in layers[:-1]:  # hidden_states[i + 1] is the output of block i ...
        torch.testing.assert_close(captured[i], out.hidden_states[i + 1])
    last = layers[-1]  # ... except the last, which already went through the final norm
    assert not torch.allclose(captured[last], out.hidden_states[last + 1])
    torch.testing.assert_close(tiny_lm.model.model.norm(captured[last]), out.hidden_states[last + 1])


def test_capture_stops_after_the_last_selected_layer(tiny_lm):
    calls = []
    blocks = tiny_lm.model.model.layers
    handle = blocks[5].register_forward_hook(lambda *a: calls.append(5))
    try:
        batch = next(iter_batches([("a", "Hi")], tiny_lm.tokenizer, 64, 16))
        with torch.inference_mode(), ResidualCapture(tiny_lm, [1, 3], lambda i, h: None) as cap:
            cap.run(batch)
    finally:
        handle.remove()
    assert calls == []


def test_length_grouping_keeps_padding_under_1_2(ntrex, tiny_lm):
    from toolkit.corpus import load

    sentences = load(f"ntrex:{ntrex}", ["en", "hi"], 400).sentences("hi")
    batches = list(iter_batches(sentences, tiny_lm.tokenizer, 4096, 128))
    padded, real = sum(b.n_padded for b in batches), sum(b.n_real for b in batches)
    assert padded / real < 1.2
    assert sorted(sid for b in batches for sid in b.sentence_ids) == sorted(s for s, _ in sentences)


def test_plan_batches_is_deterministic_and_bounded():
    lengths = [5, 50, 7, 50, 6, 49, 100]
    plan = plan_batches(lengths, batch_tokens=110)
    assert plan == plan_batches(lengths, batch_tokens=110)
    assert sorted(i for b in plan for i in b) == list(range(7))
    for b in plan:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 110


def test_layout_of_three_languages(tiny_run, tiny_lm):
    cfg, summaries = tiny_run
    files = activation_files(cfg.run_dir)
    assert sorted(files) == ["en", "hi", "ml"]
    from toolkit.corpus import load

    corpus = load(cfg.run.corpus, ["en", "hi", "ml"], 12)
    for lang, (path,) in files.items():
        with ActivationFile(path) as f:
            a = f.attrs
            assert a["layout_version"] == 1 and a["complete"] and a["language"] == lang
            assert f.layers == [0, 1, 2, 3, 25] and a["hook_point"] == "blocks.{layer}.hook_resid_post"
            assert a["model_id"] == "tiny-gemma2-random" and a["sae_source"].startswith("local:")
            assert len(a["sae_ids"]) == 5 and a["corpus_hash"] == corpus.lang_hash(lang)
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
    cfg, _ = tiny_run
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


def test_rerun_skips_finished_files(tiny_run):
    cfg, _ = tiny_run
    again = extract.run(cfg)
    assert all(s.skipped for s in again)


def test_different_config_is_refused_then_overwritten(tiny_run):
    cfg, _ = tiny_run
    other = tiny_cfg(cfg.run_dir, layers="0-4")
    with pytest.raises(UserError, match="different configuration.*--overwrite"):
        extract.run(other, [extract.Unit("en")])
    other.extract.overwrite = True
    (summary,) = extract.run(other, [extract.Unit("en")])
    with ActivationFile(summary.path) as f:
        assert f.layers == [0, 1, 2, 3, 4]


def test_truncated_file_is_reported(tmp_path, tiny_run):
    cfg, _ = tiny_run
    source = activation_files(cfg.run_dir)["ml"][0]
    broken = tmp_path / "ml.h5"
    broken.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(StoreError, match="truncated or corrupt"):
        ActivationFile(broken)


def test_sae_with_wrong_width_or_hook_is_refused(tiny_lm):
    from sae_lens import StandardSAE, StandardSAEConfig

    wrong_width = StandardSAE(StandardSAEConfig(d_in=32, d_sae=16))
    with pytest.raises(UserError, match="d_in=32 but the model width is 64"):
        saes.check(wrong_width, 3, tiny_lm.d_model, "test")
    cfg = StandardSAEConfig(d_in=64, d_sae=16)
    cfg.metadata.hook_name = "blocks.7.hook_resid_post"
    with pytest.raises(UserError, match="trained on hook 'blocks.7.hook_resid_post', not 'blocks.3"):
        saes.check(StandardSAE(cfg), 3, tiny_lm.d_model, "test")


def _sparse_of(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, cols = codes.nonzero(as_tuple=True)
    return rows, cols, codes[rows, cols]


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk", "hooked"])
def test_sparse_encode_equals_saelens_encode(arch):
    """The fast path (ReLU, JumpReLU) and the fallback (others, or hooks attached) give encode's nonzeros."""
    import sae_lens

    torch.manual_seed(0)
    if arch == "topk":
        sae = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=64, d_sae=512, k=8))
    elif arch == "jumprelu":
        sae = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=64, d_sae=512))
        with torch.no_grad():  # some negative thresholds: ReLU still zeroes negative pre-activations
            sae.threshold.copy_(torch.randn(512) * 0.5)
    else:
        sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=64, d_sae=512))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    if arch == "hooked":  # a hook that changes the codes must not be bypassed
        sae.hook_sae_acts_post.add_hook(lambda acts, hook: acts * 2)
    layer = saes.LayerSAE(0, sae.eval(), arch)
    x = torch.randn(300, 64) * 3
    with torch.inference_mode():
        expected, got = _sparse_of(sae.encode(x)), layer.encode_sparse(x)
    assert len(expected[0]) > 300  # not a trivially empty comparison
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    torch.testing.assert_close(got[2], expected[2])
    assert (saes._plain_threshold(sae) is None) == (arch in ("topk", "hooked"))
    # dense codes (alignment trains through them): the same values and the same gradient w.r.t. x
    upstream = torch.randn(300, 512)
    grads = []
    for encode in (sae.encode, layer.encode):
        xg = x.clone().requires_grad_(True)
        codes = encode(xg)
        (codes * upstream).sum().backward()
        grads.append((codes.detach(), xg.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    torch.testing.assert_close(grads[1][1], grads[0][1])


def test_dropping_decoders_keeps_the_codes(tmp_path, tiny_lm):
    """Extraction frees W_dec after quality is measured; encoding is unchanged, decoding fails loudly."""
    from sae_lens import StandardSAE, StandardSAEConfig

    for layer in (0, 1):
        cfg = StandardSAEConfig(d_in=tiny_lm.d_model, d_sae=256)
        cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
        StandardSAE(cfg).save_model(tmp_path / f"layer_{layer}")
    loaded = saes._from_dir(tmp_path, [0, 1], tiny_lm)
    x = torch.randn(50, tiny_lm.d_model)
    with torch.inference_mode():
        before = [loaded.layers[i].encode_sparse(x) for i in (0, 1)]
        loaded.drop_decoders()
        after = [loaded.layers[i].encode_sparse(x) for i in (0, 1)]
    for b, a in zip(before, after):
        assert all(torch.equal(u, v) for u, v in zip(b, a))
    sae = loaded.layers[0].sae
    assert sae.W_dec.numel() == 0 and sae.W_enc.shape == (tiny_lm.d_model, 256)
    with pytest.raises(RuntimeError, match="drop_decoders"):
        sae.decode(torch.zeros(1, 256))


def test_sae_dir_source_checks_each_layer(tmp_path, tiny_lm):
    from sae_lens import StandardSAE, StandardSAEConfig

    StandardSAE(StandardSAEConfig(d_in=48, d_sae=16)).save_model(tmp_path / "layer_0")
    cfg = Config.build({"sae": {"source": f"dir:{tmp_path}"}}, preset="tiny")
    with pytest.raises(UserError, match="d_in=48"):
        saes.load(cfg, tiny_lm, [0], None)
    with pytest.raises(UserError, match="no SAE for layer 1"):
        saes.load(cfg, tiny_lm, [1], None)


def _cli_extract(run, *extra):
    args = [sys.executable, "-m", "toolkit.submit", "extract", "--preset", "tiny", "--langs", "en",
            "--corpus", "embedded", "--batch-tokens", "128", "--layers", "0-5", "--sae", "random", "--run", str(run),
            *extra]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _datasets(path):
    out = {}
    with h5py.File(path, "r") as h5:
        h5.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    assert _cli_extract(reference).wait(timeout=300) == 0

    killed = tmp_path / "killed"
    proc = _cli_extract(killed)
    parts = killed / "activations" / "en.h5.parts"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(parts.glob("part-*.npz"))) < 3 and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "activations" / "en.h5").exists(), "the run finished before it could be killed"
    n_before = len(list(parts.glob("part-*.npz")))
    assert n_before >= 3

    resumed = _cli_extract(killed)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert not parts.exists()
    want, got = _datasets(reference / "activations" / "en.h5"), _datasets(killed / "activations" / "en.h5")
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(want[name], got[name], err_msg=name)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_mmap_threshold_is_fixed_on_glibc():
    assert extract.fixed_mmap_threshold() is True
