"""Gap numbers, bands, headlines and file merging of analysis.gaps on synthetic activation files."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from analysis.bands import default_bands, parse_bands
from analysis.gaps import GapOptions, analyse
from analysis.report import GROUP_NAME
from tests.unit.analysis_fixtures import constant_run, random_run, write_activations
from toolkit.errors import UserError
from toolkit.store import ActivationFile


def _row(report, lang, layer):
    return next(r for r in report.rows if r.language == lang and r.layer == layer)


def test_values_and_gaps_are_exact(tmp_path):
    run = constant_run(tmp_path, {"en": [16, 16, 8, 4], "hi": [12, 8, 8, 5], "es": [20, 16, 10, 4]})
    report = analyse(run, GapOptions(n_boot=50))
    assert report.languages == ["en", "es", "hi"]
    assert report.matrix("value").tolist() == [[16, 16, 8, 4], [20, 16, 10, 4], [12, 8, 8, 5]]
    assert report.matrix("gap_pct").tolist() == [[0, 0, 0, 0], [25, 0, 25, 0], [-25, -50, 0, 25]]
    assert report.matrix("gap_parallel_pct").tolist() == report.matrix("gap_pct").tolist()
    hi = _row(report, "hi", 1)
    # every sentence has the same value, so every bootstrap replicate does too
    assert (hi.ci_low, hi.ci_high, hi.gap_ci_low, hi.gap_ci_high) == (8, 8, -50, -50)
    assert (hi.n, hi.n_parallel, hi.statistic) == (6, 6, "mass")
    assert np.isnan(_row(report, "en", 0).p_value)


def test_varying_values_gap_ci_and_wilcoxon(tmp_path):
    ids = [f"s{i}" for i in range(8)]
    en = np.array([[1, 2, 3, 4, 1, 2, 3, 4]], dtype=float).T
    hi = np.array([[1, 1, 2, 2, 1, 1, 2, 2.5]], dtype=float).T
    write_activations(tmp_path / "activations" / "en.h5", "en", ids, en)
    write_activations(tmp_path / "activations" / "hi.h5", "hi", ids, hi)
    report = analyse(tmp_path, GapOptions(n_boot=300, seed=1))
    row = _row(report, "hi", 0)
    assert row.value == pytest.approx(1.5625)
    assert row.gap_pct == pytest.approx(100 * (1.5625 - 2.5) / 2.5)
    assert row.ci_low < row.value < row.ci_high
    assert row.gap_ci_low < row.gap_pct < row.gap_ci_high < 0
    assert row.p_value == pytest.approx(scipy_stats.wilcoxon(hi[:, 0], en[:, 0]).pvalue, rel=1e-12)


def test_wilcoxon_p_values_match_scipy_on_stored_values(tmp_path):
    run = random_run(tmp_path, ["en", "mr"], n_sentences=40, n_layers=3, scale={"mr": 0.95})
    report = analyse(run, GapOptions(n_boot=20))
    with ActivationFile(run / "activations" / "en.h5") as en, ActivationFile(run / "activations" / "mr.h5") as mr:
        for layer in (0, 1, 2):
            expected = scipy_stats.wilcoxon(mr.stats(layer), en.stats(layer)).pvalue
            assert _row(report, "mr", layer).p_value == pytest.approx(expected, rel=1e-10)


def test_ids_that_differ_are_refused_unless_allowed_then_the_parallel_gap_uses_the_shared_ids(tmp_path):
    en_ids = ["a", "b", "c", "d", "e", "f"]
    hi_ids = ["c", "d", "e", "f", "g", "h"]  # g, h have no English; a, b no Hindi
    write_activations(tmp_path / "en.h5", "en", en_ids, np.array([[1.0, 1, 2, 2, 4, 6]]).T)
    write_activations(tmp_path / "hi.h5", "hi", hi_ids, np.array([[1.0, 1, 3, 4, 8, 8]]).T)
    with pytest.raises(UserError, match=r"hi and en do not hold the same sentence ids \(2: 'g', 'h' only in hi; "
                                         r"2: 'a', 'b' only in en\).*--allow-id-mismatch"):
        analyse([tmp_path / "en.h5", tmp_path / "hi.h5"], GapOptions(n_boot=50))
    report = analyse([tmp_path / "en.h5", tmp_path / "hi.h5"], GapOptions(n_boot=50, allow_id_mismatch=True))
    row = _row(report, "hi", 0)
    assert row.n == 6 and row.n_parallel == 4
    assert row.gap_pct == pytest.approx(100 * (25 / 6 - 16 / 6) / (16 / 6))
    assert row.gap_parallel_pct == pytest.approx(100 * (9 / 4 - 14 / 4) / (14 / 4))
    assert any("4 parallel sentences" in note for note in report.notes)


def test_statistic_is_selectable(tmp_path):
    ids = ["a", "b"]
    for lang, scale in (("en", 1.0), ("hi", 0.5)):
        stats = {"mass": np.full((2, 1), 8.0 * scale), "l0": np.full((2, 1), 4.0), "max": np.full((2, 1), 2.0 / scale)}
        write_activations(tmp_path / "activations" / f"{lang}.h5", lang, ids, stats)
    gaps = {stat: _row(analyse(tmp_path, GapOptions(stat=stat, n_boot=10)), "hi", 0).gap_pct
            for stat in ("mass", "l0", "max")}
    assert gaps == {"mass": -50.0, "l0": 0.0, "max": 100.0}


@pytest.mark.parametrize(
    "layers, expected",
    [
        (list(range(26)), ([0, 8], [9, 17], [18, 25])),
        (list(range(18)), ([0, 5], [6, 11], [12, 17])),
        ([0, 5, 12], ([0, 0], [5, 5], [12, 12])),
        ([3, 7], ([3, 3], None, [7, 7])),
        ([4], ([4, 4], None, [4, 4])),
    ],
)
def test_default_bands_are_thirds(layers, expected):
    bands = default_bands(layers)
    ends = tuple([b[0], b[-1]] if b else None for b in bands.values())
    assert ends == expected
    assert sum(map(len, bands.values())) == len(layers) or len(layers) == 1


def test_bands_override_and_errors():
    layers = list(range(26))
    assert parse_bands("0-8,9-17,18-25", layers) == default_bands(layers)
    assert parse_bands("0-3, 4-20, 21-25", layers)["early"] == [0, 1, 2, 3]
    assert parse_bands([(0, 0), (5, 5), (12, 12)], [0, 5, 12]) == {"early": [0], "middle": [5], "deep": [12]}
    for bad in ("0-8,9-17", "0-8,8-17,18-25", "0-8,x-17,18-25", "30-31,32-33,34-35", "9-17,0-8,18-25"):
        with pytest.raises(UserError, match="bands"):
            parse_bands(bad, layers)


def test_headlines_are_exact(tmp_path):
    run = constant_run(
        tmp_path,
        {
            "en": [16, 16, 16, 16, 16, 16],
            "hi": [12, 10, 14, 16, 14, 12],  # gaps -25, -37.5, -12.5, 0, -12.5, -25
            "id": [16, 14, 16, 12, 12, 8],  # gaps 0, -12.5, 0, -25, -25, -50
            "es": [8, 8, 8, 8, 8, 8],  # not in the medium/low-resource group
        },
    )
    report = analyse(run, GapOptions(n_boot=100))
    assert report.bands == {"early": [0, 1], "middle": [2, 3], "deep": [4, 5]}
    assert report.low_langs == ["id", "hi"]
    hi, idn, group = report.headline("hi"), report.headline("id"), report.headline(GROUP_NAME)
    assert (hi.early_min_gap, hi.early_min_layer, hi.deep_mean_gap) == (-37.5, 1, -18.75)
    assert (idn.early_min_gap, idn.early_min_layer, idn.deep_mean_gap) == (-12.5, 1, -37.5)
    # group: per-layer mean of id and hi = -12.5, -25, -6.25, -12.5, -18.75, -37.5
    assert (group.early_min_gap, group.early_min_layer, group.deep_mean_gap) == (-25.0, 1, -28.125)
    assert group.languages == ["id", "hi"]
    assert group.early_ci == (-25.0, -25.0) and group.deep_ci == (-28.125, -28.125)
    assert report.headline("es").deep_mean_gap == -50.0

    custom = analyse(run, GapOptions(bands="0-2,3-3,4-5", n_boot=100)).headline(GROUP_NAME)
    assert (custom.early_min_gap, custom.early_min_layer, custom.deep_mean_gap) == (-25.0, 1, -28.125)
    custom = analyse(run, GapOptions(bands="0,1-4,5-5", n_boot=100)).headline(GROUP_NAME)
    assert (custom.early_min_gap, custom.early_min_layer, custom.deep_mean_gap) == (-12.5, 0, -37.5)


def test_headline_cis_bracket_the_estimates(tmp_path):
    run = random_run(tmp_path, ["en", "ml", "hi", "it"], n_sentences=30, scale={"ml": 0.7, "hi": 0.8})
    report = analyse(run, GapOptions(n_boot=300))
    for h in report.headlines:
        assert h.early_ci[0] <= h.early_min_gap <= h.early_ci[1]
        assert h.deep_ci[0] <= h.deep_mean_gap <= h.deep_ci[1]
    assert report.headline(GROUP_NAME).deep_ci[1] < -15


def test_layer_subset(tmp_path):
    ids = ["a", "b", "c"]
    write_activations(tmp_path / "en.h5", "en", ids, np.full((3, 3), 4.0), layers=[0, 5, 12])
    write_activations(tmp_path / "ml.h5", "ml", ids, np.tile([4.0, 3.0, 2.0], (3, 1)), layers=[0, 5, 12])
    report = analyse(tmp_path, GapOptions(n_boot=20))
    assert report.layers == [0, 5, 12]
    assert report.bands == {"early": [0], "middle": [5], "deep": [12]}
    assert report.matrix("gap_pct", ["ml"]).tolist() == [[0.0, -25.0, -50.0]]
    assert report.headline("ml").deep_mean_gap == -50.0


def test_shards_and_runs_merge_to_the_same_numbers(tmp_path):
    rng = np.random.default_rng(3)
    ids = [f"s{i:02d}" for i in range(12)]
    en, hi = rng.gamma(3.0, size=(12, 4)), rng.gamma(2.5, size=(12, 4))
    write_activations(tmp_path / "one" / "activations" / "en.h5", "en", ids, en)
    write_activations(tmp_path / "one" / "activations" / "hi.h5", "hi", ids, hi)
    # the same sentences as two shards in another processing order, and English from a second run
    first, second = [7, 2, 9, 0, 11], [1, 3, 4, 5, 6, 8, 10]
    for k, part in enumerate((first, second)):
        write_activations(
            tmp_path / "sharded" / "activations" / f"hi.shard{k:03d}-of-002.h5", "hi", [ids[i] for i in part],
            hi[part], batch_size=3, shard=(k, 2),
        )
    write_activations(tmp_path / "other" / "activations" / "en.h5", "en", ids, en, batch_size=5)
    single = analyse(tmp_path / "one", GapOptions(n_boot=200)).to_json()
    merged = analyse([tmp_path / "sharded", tmp_path / "other"], GapOptions(n_boot=200)).to_json()
    for key in ("rows", "headlines", "overlap"):
        assert merged[key] == single[key]
    assert len(merged["metadata"]["sources"]["hi"]) == 2


def test_mismatched_model_is_refused(tmp_path):
    write_activations(tmp_path / "en.h5", "en", ["a"], np.ones((1, 2)))
    write_activations(tmp_path / "hi.h5", "hi", ["a"], np.ones((1, 2)), model_id="other/model")
    with pytest.raises(UserError, match=r"en\.h5 and .*hi\.h5 cannot be analysed together: their model_id differs"):
        analyse(tmp_path)


@pytest.mark.parametrize(
    "override, attribute",
    [({"layers": [0, 2]}, "layers"), ({"sae_ids": ["x", "y"]}, "sae_ids"), ({"sae_source": "other"}, "sae_source")],
)
def test_mismatched_saes_or_layers_are_refused(tmp_path, override, attribute):
    write_activations(tmp_path / "en.h5", "en", ["a"], np.ones((1, 2)))
    layers = override.pop("layers", None)
    write_activations(tmp_path / "hi.h5", "hi", ["a"], np.ones((1, 2)), layers=layers, **override)
    with pytest.raises(UserError, match=f"their {attribute} differs"):
        analyse(tmp_path)


def test_missing_english_is_refused(tmp_path):
    write_activations(tmp_path / "hi.h5", "hi", ["a"], np.ones((1, 2)))
    with pytest.raises(UserError, match="no activation file for the reference language 'en'"):
        analyse(tmp_path)


def test_duplicate_sentence_ids_are_refused(tmp_path):
    write_activations(tmp_path / "en.h5", "en", ["a", "b"], np.ones((2, 1)))
    write_activations(tmp_path / "hi.shard000-of-002.h5", "hi", ["a", "b"], np.ones((2, 1)))
    write_activations(tmp_path / "hi.shard001-of-002.h5", "hi", ["b", "c"], np.ones((2, 1)))
    with pytest.raises(UserError, match=r"language 'hi': sentence id 'b' appears in .*shard000.* and .*shard001"):
        analyse(tmp_path)


def test_bad_arguments_are_user_errors(tmp_path):
    constant_run(tmp_path, {"en": [1.0], "hi": [1.0]})
    with pytest.raises(UserError, match="unknown statistic"):
        analyse(tmp_path, GapOptions(stat="mean"))
    with pytest.raises(UserError, match="n_boot"):
        analyse(tmp_path, GapOptions(n_boot=0))
    with pytest.raises(UserError, match="no such file"):
        analyse(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no activation files"):
        analyse(tmp_path / "empty")
