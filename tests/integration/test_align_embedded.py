"""Activation-aware LoRA on the embedded Gemma 3 270M: a few steps on NTREX Hindi with small local SAEs."""

import json
import math

import pytest

from jobs import align as align_job
from toolkit.config import Config


@pytest.mark.integration
def test_a_short_hindi_run_writes_finite_metrics_and_before_after(ntrex, tmp_path):
    cfg = Config.build({
        "run": {"run": str(tmp_path), "langs": "hi", "corpus": f"ntrex:{ntrex}", "max_sentences": 30,
                "layers": "0-17:4"},
        "sae": {"source": "train", "width": 256, "train_tokens": 3000, "batch": 256},
        "extract": {"max_length": 64},
        "align": {"steps": 3, "batch_size": 2, "checkpoint_every": 2, "align_layers": "0-17:4"},
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
    assert set(report["languages"]) == {"en", "hi"} and report["heldout_sentences"] == 6
    for lang, v in report["languages"].items():
        values = [*v["gain_pct"].values(), v["ppl_before"], v["ppl_after"]]
        assert all(x is not None and math.isfinite(x) for x in values), (lang, v)
    assert math.isfinite(report["english_retention_pct"])
    assert summaries[0]["english_retention_pct"] == report["english_retention_pct"]
