"""The align job: its targets, and the before/after report on held-out text."""

import json
import math

import numpy as np
import pytest

from jobs import align as align_job
from toolkit import align
from toolkit import corpus as corpora
from toolkit.config import Config
from toolkit.errors import UserError
from toolkit.store import ActivationFile


def test_one_target_per_language_or_one_joint_target():
    cfg = Config.build({"run": {"langs": "hi,ml,es"}}, preset="tiny")
    assert [u.name for u in align_job.align_targets(cfg)] == ["es", "ml", "hi"]
    assert [u.name for u in align_job.align_targets(cfg, ["ml"])] == ["ml"]
    joint = Config.build({"run": {"langs": "hi,ml"}, "align": {"joint": True}}, preset="tiny")
    assert [(u.name, u.targets) for u in align_job.align_targets(joint)] == [("joint", ["ml", "hi"])]
    with pytest.raises(UserError, match="non-English languages of the run"):
        align_job.align_targets(cfg, ["mr"])
    with pytest.raises(UserError, match="non-English"):
        align_job.align_targets(Config.build({"run": {"langs": "hi"}, "align": {"targets": "en"}}, preset="tiny"))


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


def test_after_files_keep_the_sae_recipe_and_provenance(tmp_path):
    """The held-out measurement is written outside the run's own activations (RUN/align/...), with and without the
    adapter: its files still name the run's SAE set and carry its training recipe, and the adapted ones the
    adapter. The gain report's summary block is there, with the `none` objective's own name."""
    from tests.unit.align.conftest import cfg_for

    cfg = cfg_for(tmp_path, **{"sae.source": "train", "align.steps": 2, "align.objective": "none",
                               "run.langs": "hi", "align.align_layers": "0-25:10", "run.layers": "0-25:10"})
    align_job.run(cfg)
    recipes = list((tmp_path / "saes").glob("*/training.json"))
    assert len(recipes) == 1
    folder = tmp_path / "align" / "hi"
    report = json.loads((folder / "before_after.json").read_text())
    files = {"base": list((tmp_path / "align").glob("base-*/activations/hi.h5")),
             "after": [folder / "after" / "activations" / "hi.h5"]}
    assert len(files["base"]) == 1
    for kind, (path,) in files.items():
        with ActivationFile(path) as f:
            attrs = f.attrs
        assert attrs["sae_recipe"] == recipes[0].read_text(), kind
        assert attrs["sae_source"] == f"local:{recipes[0].parent.name}", kind
        assert ("adapter" in attrs["model_id"]) is (kind == "after")
        assert attrs["adapter"] == (str(folder / "adapter") if kind == "after" else "")
    summary = report["summary"]
    assert set(summary) >= {"objective", "lambda_align", "lambda_keep", "lr", "lora_targets", "lora_r", "seed",
                            "closure_pct", "norm_adjusted_gain_pct", "gain_pct", "english_kl",
                            "english_retention_pct", "fve_drop", "target_bpb", "minutes", "guards_ok"}
    assert summary["objective"] == "none" and summary["minutes"] > 0
    assert report["alignment"]["hi"]["english"]["kl"] >= 0


def test_the_before_after_and_gain_tables_fit_80_columns_with_every_cell_whole(reference):
    """align prints its before/after table and the gain report; at 80 columns no header or value is cut."""
    import io

    from rich.console import Console

    cfg, _, _ = reference
    report = json.loads((cfg.run_dir / "align" / "hi" / "before_after.json").read_text())
    console = Console(width=80, record=True, file=io.StringIO())
    align_job.print_before_after(report, console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
    for header in ("A before", "A after", "gain %", "bpb", "closure %", "norm-adj. gain %", "EN KL", "FVE drop",
                   "vs none: closure", "weighted", "early", "middle", "deep"):
        assert header in text, header
