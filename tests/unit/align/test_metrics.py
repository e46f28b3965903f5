"""The gain report's arithmetic on measurements written by hand: closure, norm-adjusted gain, retention, shares,
guards, and the difference from a none arm."""

import dataclasses
import math

import pytest

from toolkit.align import metrics as am
from toolkit.config import AlignConfig, ExtractConfig

LAYERS = [0, 1, 2]
IDS = ["s1", "s2", "s3", "s4"]


def _side(
    mass: dict[int, float],
    norm: dict[int, float],
    nll: float = 10.0,
    fve: float = 0.8,
    features: dict[int, list[float]] | None = None,
) -> dict:
    """A language measured on four sentences, each with the same values."""
    rec = {
        "ids": IDS,
        "mass": {str(i): [m, m, m, m] for i, m in mass.items()},
        "norm": {str(i): [n] * 4 for i, n in norm.items()},
        "nll": [nll] * 4,
        "bytes": [100] * 4,
        "tokens": [20] * 4,
        "fve": {str(i): fve for i in LAYERS},
        "l0": {str(i): 30.0 for i in LAYERS},
    }
    if features:
        rec["features"] = {str(i): f for i, f in features.items()}
    return rec


def _measurements(after_hi: dict[int, float], after_norm: float = 1.0, kl: float = 0.2, fve_after: float = 0.79):
    before = {
        "hi": _side(
            {0: 5.0, 1: 1.0, 2: 2.0},
            dict.fromkeys(LAYERS, 10.0),
            nll=30.0,
            features={i: [1.0, 0.0, 0.0] for i in LAYERS},
        ),
        "en": _side(
            {0: 4.0, 1: 2.0, 2: 4.0}, dict.fromkeys(LAYERS, 10.0), features={i: [0.5, 1.5, 0.0] for i in LAYERS}
        ),
    }
    after = {
        "hi": _side(
            after_hi,
            {0: 10.0, 1: 10.0, 2: 10.0 * after_norm},
            nll=28.0,
            fve=fve_after,
            features={i: [1.0, 0.5, 0.25] for i in LAYERS},
        ),
        "en": _side(
            {0: 4.0, 1: 2.0, 2: 4.04}, dict.fromkeys(LAYERS, 10.0), features={i: [0.5, 1.5, 0.0] for i in LAYERS}
        ),
    }
    after["en"]["english_kl"] = {"ids": IDS, "kl": [kl] * 4, "tokens": [20] * 4}
    return before, after


SPEC = am.MeasureSpec(
    LAYERS, {"hi": {0: 0.0, 1: 1.0, 2: 2.0}}, ExtractConfig(), AlignConfig(objective="mass"), "tiny", seed=0
)


def test_closure_gain_and_norm_adjustment_follow_their_definitions():
    before, after = _measurements({0: 5.0, 1: 1.5, 2: 4.0}, after_norm=1.25)
    t = am.compare(before, after, SPEC)["alignment"]["hi"]
    assert t["weighted_layers"] == [1, 2]  # layer 0: the target was not weaker there (w = 0)
    # layer 1 closes (1.5 - 1) / 2 of a gap of (2 - 1) / 2; layer 2 (4 - 2) / 4 of (4 - 2) / 4; weights 1 and 2
    assert t["closure_pct"] == pytest.approx(100 * (0.25 + 2 * 0.5) / (0.5 + 2 * 0.5))
    assert t["gain_pct"] == pytest.approx((50 + 2 * 100) / 3)
    # layer 2's residual norm rose 25 %: its norm-adjusted gain is 100 (2 / 1.25 - 1) = 60 %
    assert t["norm_adjusted_gain_pct"] == pytest.approx((50 + 2 * 60) / 3)
    assert t["dlog_A_minus_dlog_norm"] == pytest.approx((math.log(1.5) + 2 * (math.log(2) - math.log(1.25))) / 3)
    assert t["resid_norm_change_pct"] == pytest.approx(2 * 25 / 3)
    assert t["english_retention_pct"] == pytest.approx((100 + 2 * 101) / 3)
    assert t["english"]["kl"] == pytest.approx(0.2 / 20)
    assert t["target_bpb"] == pytest.approx(4 * 28 / (math.log(2) * 400))
    assert t["sae_quality"]["fve_drop"] == pytest.approx(0.01)
    assert t["sae_quality"]["fve_drop_flagged_layers"] == []
    # the target's feature mass rose by 0.5 on a feature English uses and by 0.25 on one it does not
    assert t["feature_shares"]["gain_on_english_features_pct"] == pytest.approx(50)
    assert t["feature_shares"]["gain_on_target_only_features_pct"] == pytest.approx(25)
    assert not t["overshoot"] and t["vs_none"] is None
    low, high = t["closure_pct_ci"]
    assert low == pytest.approx(t["closure_pct"]) and high == pytest.approx(t["closure_pct"])  # no spread


def test_closure_over_every_layer_below_english_counts_the_layers_the_term_left_out():
    """align_layers `auto` leaves the output layers out of the weights: the headline closure is over the weighted
    layers, closure_every_layer_pct over every layer where the target was below English, each layer weighing 1."""
    before, after = _measurements({0: 5.0, 1: 1.5, 2: 4.0}, after_norm=1.25)
    spec = dataclasses.replace(SPEC, weights={"hi": {0: 0.0, 1: 1.0, 2: 0.0}})  # layer 2 not aligned
    t = am.compare(before, after, spec)["alignment"]["hi"]
    assert t["weighted_layers"] == [1]
    assert t["closure_pct"] == pytest.approx(100 * 0.25 / 0.5)
    # layers 1 and 2 (layer 0 was above English): (0.25 + 0.5) of (0.5 + 0.5)
    assert t["closure_every_layer_pct"] == pytest.approx(100 * (0.25 + 0.5) / (0.5 + 0.5))
    assert am.compare(before, after, SPEC)["alignment"]["hi"]["closure_every_layer_pct"] == pytest.approx(75)


def test_overshoot_is_flagged_and_guards_fail_by_name():
    before, after = _measurements({0: 5.0, 1: 3.0, 2: 6.0}, kl=1.0, fve_after=0.7)
    report = am.compare(before, after, SPEC)
    t = report["alignment"]["hi"]
    assert t["closure_pct"] == pytest.approx(200) and t["overshoot"]
    assert t["sae_quality"]["fve_drop_flagged_layers"] == [1, 2]
    summary = am.summarise(report, SPEC, minutes=1.5)
    assert set(am.SUMMARY_KEYS) <= set(summary)
    assert summary["guards"] == {"english_kl": False, "english_retention": True, "fve_drop": False}
    assert summary["guards_ok"] is False and summary["objective"] == "mass" and summary["minutes"] == 1.5


def test_numbers_are_differences_from_the_none_arm_when_it_measured_the_same_sentences():
    before, none_after = _measurements({0: 5.0, 1: 1.0, 2: 2.0})
    none = am.compare(before, none_after, SPEC)
    _, after = _measurements({0: 5.0, 1: 1.5, 2: 4.0}, kl=0.1)
    after["hi"]["nll"] = [30.0, 30.0, 30.0, 34.0]  # worse than none's 28 nats: the bpb guard fails
    report = am.compare(before, after, SPEC, none)
    vs = report["alignment"]["hi"]["vs_none"]
    assert vs["closure"]["delta"] == pytest.approx(report["alignment"]["hi"]["closure_pct"])  # none closed 0 %
    assert vs["english_kl"]["delta"] == pytest.approx((0.1 - 0.2) / 20)
    assert vs["target_bpb"]["ci_low"] <= vs["target_bpb"]["delta"] <= vs["target_bpb"]["ci_high"]
    assert vs["none_target_bpb"] == pytest.approx(none["alignment"]["hi"]["target_bpb"])
    summary = am.summarise(report, SPEC, minutes=1.0)
    assert summary["guards"]["target_bpb_vs_none"] is False
    other = dict(none)
    other["alignment"] = {"hi": {**none["alignment"]["hi"], "per_sentence": {"ids": ["x"] * 4}}}
    assert am.compare(before, after, SPEC, other)["alignment"]["hi"]["vs_none"] is None  # other sentences


def test_a_later_targets_run_completes_the_shared_base_measurement(tiny, tmp_path):
    """The base measurement is shared by every target of a split: the second target's run adds the quality
    figures its target needs and reuses the rest (the first target's file is not written again)."""
    cfg, lm, saes, corpus, split, layers = tiny
    held = corpus.subset(split.heldout[:3])
    spec = am.MeasureSpec(layers[:2], {"hi": dict.fromkeys(layers[:2], 1.0)}, cfg.extract, cfg.align, "tiny", 0)
    first = am.measure(lm, saes, held, spec, tmp_path, ["hi", "en"], ("", "", None))
    assert "fve" in first["hi"] and "fve" not in first["es"]
    stamp = (tmp_path / "activations" / "hi.h5").stat().st_mtime_ns
    second = am.measure(lm, saes, held, spec, tmp_path, ["es", "en"], ("", "", None))
    assert "fve" in second["es"] and second["hi"] == first["hi"]
    assert (tmp_path / "activations" / "hi.h5").stat().st_mtime_ns == stamp
    assert second["es"]["ids"] == held.ids and len(second["es"]["mass"][str(layers[0])]) == 3
