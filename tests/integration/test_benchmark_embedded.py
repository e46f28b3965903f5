"""The extraction benchmark end to end on the embedded model, at a smoke size: every part runs, every key is written.

The numbers are not judged here (benchmarks run on purpose, on an idle machine: docs/performance.md);
what is checked is that each measurement is made and that its bookkeeping holds.
"""

import json

import pytest

from benchmarks import extract_throughput

pytestmark = pytest.mark.integration

KEYS = {"forward_tps", "capture_tps", "encode_tps", "encode_controls_tps", "controls_cost_over_encode",
        "pipeline_tps", "floor_tps", "pipeline_over_floor",
        "capture_over_forward", "saelens_all_layers_tps", "pipeline_over_saelens", "rss_ratio_16x", "bytes_per_token",
        "align_step_ratio", "machine", "threads", "torch", "date"}


def test_quick_benchmark_writes_every_measurement(tmp_path, ntrex):
    out = tmp_path / "perf.json"
    extract_throughput.main(["--quick", "--corpus", f"ntrex:{ntrex}", "--sentences", "3", "--repeats", "1",
                             "--skip", "tiny", "--json", str(out)])
    r = json.loads(out.read_text())
    assert KEYS <= set(r)
    assert r["pipeline_over_saelens"] == pytest.approx(r["pipeline_tps"] / r["saelens_all_layers_tps"])
    assert r["saelens_all_layers_tps"] == pytest.approx(r["saelens"]["one_layer_tps"] / r["layers"])
    assert r["rss_ratio_16x"] == pytest.approx(r["rss_bytes"]["16"] / r["rss_bytes"]["1"])
    assert r["rss_bytes"]["1"] > 1e9  # the model and 18 SAEs of 16k features are in memory
    assert r["code_bytes_per_token"] < r["bytes_per_token"]
    assert r["align"]["align_step_s"] > 0 and r["align"]["lm_step_s"] > 0
