"""The run summary: sections for the stages that ran, the command for those that did not, summary.json."""

import json

from analysis import summary
from tests.unit.analysis_fixtures import random_run
from toolkit.rundir import RunDir


def _before_after(folder, targets):
    (folder / "adapter").mkdir(parents=True)  # a trained adapter: what makes a folder an alignment unit
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    langs = {"en": {"role": "reference", "gain_pct_mean": 0.4, "gain_pct_pooled": 0.3, "retention_pct_mean": 100.4,
                    "ppl_before": 30.0, "ppl_after": 30.5},
             "hi": {"role": "target", "gain_pct_mean": 21.5, "gain_pct_pooled": 19.0, "retention_pct_mean": 121.5,
                    "ppl_before": 12.0, "ppl_after": 11.0}}
    head = {"objective": "mass", "closure_pct": 61.25, "norm_adjusted_gain_pct": 12.5, "gain_pct": 21.5,
            "english_kl": 0.0123, "english_retention_pct": 100.4, "fve_drop": 0.004, "target_bpb": 0.91,
            "minutes": 7.5, "guards": {"english_kl": True, "fve_drop": False}, "guards_ok": False}
    (folder / "before_after.json").write_text(json.dumps(
        {"targets": targets, "heldout_sentences": 29, "english_retention_pct": 100.4, "languages": langs,
         "summary": head}))


def _results(folder):
    folder.mkdir(parents=True)
    row = {"task": "arc", "status": "ok", "n": 200, "acc": 0.25, "p_gold_norm": 0.26, "p_gold_norm_stderr": 0.004}
    results = [{**row, "model": m, "language": lang} for m in ("base", "adapted:hi") for lang in ("en", "hi")]
    comparisons = [{"model": "adapted:hi", "task": "arc", "language": "hi", "delta_p_gold_norm": 0.012,
                    "delta_p_gold_norm_ci_low": 0.004, "delta_p_gold_norm_ci_high": 0.02}]
    correlations = [{"band": "deep", "model": "base", "task": "arc", "y": "p_gold", "n": 9, "spearman": -0.7,
                     "spearman_p": 0.04, "pearson": -0.6, "pearson_p": 0.08},
                    {"band": "early", "model": "base", "task": "arc", "y": "acc", "n": 9, "spearman": None,
                     "spearman_p": None, "pearson": None, "pearson_p": None}]
    (folder / "results.json").write_text(json.dumps(
        {"config": {"primary": {"arc": "p_gold_norm"}}, "results": results, "comparisons": comparisons,
         "bpb": [{"model": "base", "language": "hi", "bpb": 0.83}], "bpb_comparisons": [],
         "correlations": correlations}))


def test_a_run_without_alignment_or_evaluation_says_how_to_get_them(tmp_path):
    run = random_run(tmp_path / "run", ["en", "hi"])
    text = summary.render_text(summary.collect(run))
    assert "alignment: not run" in text and "toolkit.submit align --run" in text
    assert "evaluation: not run" in text and "toolkit.submit evaluate --run" in text


def test_every_stage_that_ran_has_its_section(tmp_path):
    run = random_run(tmp_path / "run", ["en", "hi"])
    _before_after(run / "align" / "hi", ["hi"])
    _results(run / "eval")
    data = summary.collect(run, gaps={"statistic": "mass"})
    text = summary.render_text(data, width=120)
    assert "alignment" in text and "+21.5" in text and "121.5" in text
    assert "gain report" in text and "61.2" in text and "0.0123" in text and "fail:" in text and "fve_drop" in text
    assert "evaluation · arc · p_gold_norm" in text and "0.260±0.004" in text and "Δ +0.012 [+0.004, +0.020]" in text
    assert "0.830" in text and "gap ↔ performance" in text and "-0.70" in text
    assert len(data["evaluation"]["correlations"]) == 1  # rows without a p-value are left out
    path = summary.write(data, RunDir(tmp_path).report_folder)
    assert path == tmp_path / "reports" / "summary.json"
    assert json.loads(path.read_text())["alignment"][0]["targets"] == ["hi"]


def test_an_unreadable_section_names_its_file(tmp_path):
    run = random_run(tmp_path / "run", ["en", "hi"])
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text("{not json")
    text = summary.render_text(summary.collect(run), width=400)
    assert "results.json is unreadable" in text and "rerun evaluate" in text


def test_a_joint_adapter_is_reported_like_the_others_and_sweep_points_are_counted(tmp_path):
    run = random_run(tmp_path / "run", ["en", "hi"])
    _before_after(run / "align" / "hi", ["hi"])
    _before_after(run / "align" / "joint", ["hi", "ml"])
    _before_after(run / "align" / "hi@lr=0.001", ["hi"])
    _before_after(run / "align" / "hi@lr=0.002", ["hi"])
    (run / "align" / "ml" / "checkpoints").mkdir(parents=True)  # training, no adapter yet: not a unit
    (run / "align" / "base-0123abcd" / "activations").mkdir(parents=True)  # the shared base measurement
    (run / "align" / "es" / "adapter").mkdir(parents=True)  # an adapter without its measurement
    (run / "align" / "es" / "adapter" / "adapter_config.json").write_text("{}")
    data = summary.collect(run)
    assert [a["adapter"] for a in data["alignment"]] == ["es", "hi", "joint"] and data["sweep_points"] == 2
    assert data["alignment"][2]["targets"] == ["hi", "ml"] and "not measured" in data["alignment"][0]["error"]
    text = summary.render_text(data, width=200)
    assert "joint" in text and "alignment sweep: 2 point adapter(s)" in text and "analysis.align_sweep" in text
    assert "alignment: not run" not in text
