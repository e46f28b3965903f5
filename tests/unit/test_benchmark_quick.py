"""The extraction benchmark end to end, at a smoke size on the tiny model: every part runs, every key is written.

The numbers are not judged here (benchmarks run on purpose, on an idle machine: docs/performance.md);
what is checked is that each measurement is made and that its bookkeeping holds. The embedded model is
the benchmark's default; its parts are the same code with another model directory. The memory part (two
extract commands in child processes) is its own test, so that neither runs over 30 s.
"""

import json

import pytest

from benchmarks import extract_throughput

KEYS = {
    "forward_tps",
    "capture_tps",
    "encode_tps",
    "encode_controls_tps",
    "controls_cost_over_encode",
    "pipeline_tps",
    "floor_tps",
    "pipeline_over_floor",
    "capture_over_forward",
    "saelens_all_layers_tps",
    "pipeline_over_saelens",
    "bytes_per_token",
    "align_step_ratio",
    "machine",
    "threads",
    "torch",
    "date",
}
QUICK = [
    "--quick",
    "--preset",
    "tiny",
    "--corpus",
    "embedded",
    "--sentences",
    "3",
    "--repeats",
    "1",
    "--sae-width",
    "512",
    "--l0",
    "16",
]


def test_quick_benchmark_writes_every_measurement(tmp_path):
    out = tmp_path / "perf.json"
    extract_throughput.main([*QUICK, "--skip", "memory", "--json", str(out)])
    r = json.loads(out.read_text())
    assert KEYS <= set(r)
    assert "tiny" not in r and "rss_bytes" not in r  # the tiny ladder is the main one here; memory is skipped
    assert r["layers"] == 26
    assert r["pipeline_over_saelens"] == pytest.approx(r["pipeline_tps"] / r["saelens_all_layers_tps"])
    assert r["saelens_all_layers_tps"] == pytest.approx(r["saelens"]["one_layer_tps"] / r["layers"])
    assert r["code_bytes_per_token"] < r["bytes_per_token"]
    assert r["align"]["align_step_s"] > 0 and r["align"]["lm_step_s"] > 0


def test_quick_memory_runs_the_extract_command_at_1x_and_16x(tmp_path):
    args = extract_throughput.parse_args(QUICK)
    saes = extract_throughput.build("tiny", args, tmp_path / "run", 512, 16)[4]
    for layer, s in saes.layers.items():
        s.sae.save_model(tmp_path / "saes" / f"layer_{layer}")
    rss = extract_throughput.peak_rss(args, tmp_path / "saes", tmp_path, (1, 16), batch_tokens=256)
    r = extract_throughput.memory_result(rss)
    assert set(r["rss_bytes"]) == {"1", "16"} and "rss_ratio_4x" not in r
    assert r["rss_ratio_16x"] == pytest.approx(rss[16] / rss[1])
    assert rss[1] > 2e8  # the child's own peak: a Python process with torch and the model loaded
