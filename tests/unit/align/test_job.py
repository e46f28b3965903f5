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
