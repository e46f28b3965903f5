"""Benchmark mechanics on small shapes: the ladder's bookkeeping, calibrated SAEs, the GPU script on a CPU.

Throughput itself is never asserted here: benchmarks are run on purpose (docs/performance.md).
"""

import json

import pytest
import torch

from benchmarks import paper_gpu
from benchmarks.ladder import calibration_batches, jumprelu_saes, plan, run_ladder
from toolkit import corpus as corpora
from toolkit.capture import ResidualCapture
from toolkit.config import Config
from toolkit.store import ActivationFile


def test_random_jumprelu_saes_fire_about_l0_features_on_unseen_text(tiny_lm):
    cfg = Config.build({"run": {"langs": "hi"}}, preset="tiny")
    corpus = corpora.load("embedded", cfg.lang_codes, 60)
    by_lang = plan(cfg, tiny_lm, corpus)
    layers = [0, 12, 25]
    saes = jumprelu_saes(tiny_lm, layers, width=512, l0=16, calibration=calibration_batches(by_lang, 2))
    unseen = [b for bs in by_lang.values() for b in bs[2:]]
    counts = {i: [] for i in layers}
    with torch.inference_mode(), ResidualCapture(tiny_lm, layers, lambda i, h: None) as cap:
        for batch in unseen:
            cap.sink = lambda i, h, keep=batch.keep: counts[i].append(
                (saes.layers[i].sae.encode(h[keep]) > 0).sum(1).float())
            cap.run(batch)
    for layer in layers:
        l0 = torch.cat(counts[layer]).mean().item()
        assert 8 <= l0 <= 32, (layer, l0)  # random ReLU SAEs would fire on ~256 of 512


@pytest.fixture(scope="module")
def ladder(tiny_lm, tmp_path_factory):
    work = tmp_path_factory.mktemp("ladder")
    cfg = Config.build({"run": {"langs": "hi", "run": str(work)}}, preset="tiny")
    corpus = corpora.load("embedded", cfg.lang_codes, 12)
    layers = list(range(tiny_lm.n_layers))
    calibration = [b for bs in plan(cfg, tiny_lm, corpus).values() for b in bs]
    saes = jumprelu_saes(tiny_lm, layers, width=256, l0=8, calibration=calibration)
    return run_ladder(cfg, tiny_lm, saes, corpus, layers, repeats=1, work_dir=work), corpus


def test_ladder_counts_the_tokens_the_pipeline_wrote(ladder):
    result, corpus = ladder
    stored = sentences = 0
    for path in result["files"]:
        with ActivationFile(path) as f:
            stored += int(f.attrs["n_tokens"])
            sentences += f.n_sentences
    assert sentences == len(corpus.ids) * len(corpus.langs)
    assert result["tokens"] == stored + sentences  # the files leave out BOS, the ladder counts it
    assert result["padded_tokens"] >= result["tokens"]


def test_ladder_ratios_follow_from_the_rungs(ladder):
    r, _ = ladder
    assert r["floor_tps"] == pytest.approx(1 / (1 / r["forward_tps"] + 1 / r["encode_tps"]))
    assert r["pipeline_over_floor"] == pytest.approx(r["pipeline_tps"] / r["floor_tps"])
    assert r["capture_over_forward"] == pytest.approx(r["capture_tps"] / r["forward_tps"])
    assert all(r[k] > 0 for k in ("forward_tps", "capture_tps", "encode_tps", "pipeline_tps"))


def test_paper_gpu_script_runs_reduced_on_a_cpu(tmp_path):
    out = tmp_path / "paper.json"
    paper_gpu.main(["--reduced", "--device", "cpu", "--sentences", "2", "--repeats", "1", "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["shape"] == paper_gpu.REDUCED and r["device"] == "cpu"
    assert r["pipeline_over_floor"] == pytest.approx(r["pipeline_tps"] / r["floor_tps"])
    assert {"machine", "threads", "torch", "date"} <= set(r)


def test_paper_shape_is_gemma_2_2b():
    from transformers import Gemma2Config

    config = Gemma2Config(**paper_gpu.PAPER, query_pre_attn_scalar=256)
    n = config.num_hidden_layers * (
        config.hidden_size * config.head_dim * (config.num_attention_heads * 2 + config.num_key_value_heads * 2)
        + 3 * config.hidden_size * config.intermediate_size) + config.vocab_size * config.hidden_size
    assert 2.5e9 < n < 2.7e9  # Gemma-2-2B has 2.61B parameters


def test_memory_probe_reports_the_child_not_the_parent(tmp_path):
    import subprocess
    import sys

    from benchmarks.extract_throughput import RSS_CHILD

    ballast = torch.ones(400_000_000)  # 1.6 GB held by this process while the child runs
    report = tmp_path / "hwm.txt"
    done = subprocess.run([sys.executable, "-c", RSS_CHILD, str(report), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "extract" in done.stdout
    child_kb = int(report.read_text().split()[1])
    assert 10_000 < child_kb < ballast.numel() * 4 / 1024 / 2
