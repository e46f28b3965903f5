"""The instrument panel: SAE gaps beside SAE-free controls and per-language SAE fidelity, on synthetic files
whose controls are known, and on files written before the controls existed (layout 1)."""

import json

import numpy as np
import pytest

from analysis import instrument
from analysis.gaps import GapOptions, analyse, write_report
from tests.unit.analysis_fixtures import write_activations
from toolkit.errors import UserError

IDS = [f"s{i:03d}" for i in range(40)]
LAYERS = 6


def controlled_run(run, mass: dict[str, float], norm: dict[str, float], fve: dict[str, float], seed: int = 0,
                   n_tokens: int = 4):
    """Per language: mass and resid_norm scaled as given (with noise), FVE per sentence as given."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(6.0, 1.0, size=(len(IDS), LAYERS))
    for lang in mass:
        noise = rng.normal(1.0, 0.05, size=base.shape)
        dev = np.full(base.shape, 10.0)
        stats = {"mass": base * noise * mass[lang], "resid_norm": 100 * base * noise * norm[lang],
                 "recon_err": np.full(base.shape, 1 - fve[lang]), "sq_err": dev * (1 - fve[lang]), "sq_dev": dev}
        write_activations(run / "activations" / f"{lang}.h5", lang, IDS, stats, n_tokens=n_tokens)
    return run


@pytest.mark.parametrize("gap, ci, ref_gap, ref_ci, expected", [
    (-30, (-35, -25), -40, (-45, -35), "agrees"),
    (+30, (25, 35), -40, (-45, -35), "disagrees"),
    (-30, (-35, 2), -40, (-45, -35), "unclear"),  # the control's CI includes 0
    (-30, (-35, -25), -40, (-45, 1), "unclear"),  # the SAE gap's CI includes 0
    (float("nan"), (-1, 1), -40, (-45, -35), "unclear"),
])
def test_agreement_needs_the_same_sign_and_both_intervals_clear_of_zero(gap, ci, ref_gap, ref_ci, expected):
    assert instrument.agreement(gap, ci, ref_gap, ref_ci) == expected


def test_a_control_that_contradicts_the_sae_gap_is_said_in_words(tmp_path):
    run = controlled_run(tmp_path / "run", mass={"en": 1.0, "hi": 1.8}, norm={"en": 1.0, "hi": 0.5},
                         fve={"en": 0.9, "hi": 0.5})
    report = analyse(run, GapOptions(n_boot=200, low_langs=["hi"]))
    panel = report.instrument
    assert not panel.missing
    for band in ("early", "middle", "deep"):
        sae, ctrl = panel.row("hi", band, "mass"), panel.row("hi", band, "resid_norm")
        assert sae.gap_pct == pytest.approx(80, abs=5) and ctrl.gap_pct == pytest.approx(-50, abs=5)
        assert ctrl.agrees == "disagrees" and panel.row("hi", band, "l0").agrees == "agrees"
        assert panel.band_fve["hi"][band] == pytest.approx(0.5) and panel.band_fve["en"][band] == pytest.approx(0.9)
    assert all("DISAGREE" in v for v in panel.verdicts[:3])
    assert any("hi 0.50" in s for s in panel.low_fidelity)
    out = write_report(report, tmp_path / "reports")
    text = (out / "report.txt").read_text()
    assert "DISAGREE" in text and "instrument check" in text and "resid_norm" in text
    saved = json.loads((out / "gaps.json").read_text())["instrument"]
    assert {r["measure"] for r in saved["rows"]} == {"mass", "l0", "resid_norm", "position-matched"}
    assert (out / "figures" / "instrument.png").stat().st_size > 0


def test_a_gap_that_survives_its_control_is_said_to(tmp_path):
    run = controlled_run(tmp_path / "run", mass={"en": 1.0, "hi": 0.6}, norm={"en": 1.0, "hi": 0.7},
                         fve={"en": 0.9, "hi": 0.85})
    panel = analyse(run, GapOptions(n_boot=200, low_langs=["hi"])).instrument
    assert all("survives" in v for v in panel.verdicts[:3])
    assert panel.low_fidelity == []


def test_position_matched_gap_compares_the_same_positions(tmp_path):
    # hi sentences have 8 tokens, en 4; hi's first 4 tokens carry one feature each, its last 4 carry three:
    # the plain per-token mean says hi is 2x en, the first-4-positions comparison says equal.
    run = tmp_path / "run"
    stats = {k: np.ones((len(IDS), 2)) for k in ("mass", "resid_norm", "recon_err", "sq_err", "sq_dev")}
    write_activations(run / "activations" / "en.h5", "en", IDS, stats, n_tokens=4, layers=[0, 1])
    hi_codes = {layer: [[[1]] * 4 + [[1, 2, 3]] * 4 for _ in IDS] for layer in (0, 1)}
    write_activations(run / "activations" / "hi.h5", "hi", IDS, stats, n_tokens=8, layers=[0, 1], features=hi_codes)
    panel = analyse(run, GapOptions(n_boot=50, low_langs=["hi"])).instrument
    assert panel.layer_gaps["position-matched"]["hi"] == pytest.approx([0.0, 0.0])


def test_too_few_shared_positions_are_said(tmp_path):
    run = controlled_run(tmp_path / "run", mass={"en": 1.0, "hi": 0.6}, norm={"en": 1.0, "hi": 0.7},
                         fve={"en": 0.9, "hi": 0.9}, n_tokens=1)
    panel = analyse(run, GapOptions(n_boot=50, low_langs=["hi"])).instrument
    assert "position-matched" not in panel.layer_gaps
    assert any("position-matched gaps skipped" in v for v in panel.verdicts)


def test_files_without_controls_are_read_and_reported_as_lacking_them(tmp_path):
    run = tmp_path / "run"
    rng = np.random.default_rng(0)
    for lang in ("en", "hi"):
        write_activations(run / "activations" / f"{lang}.h5", lang, IDS, rng.gamma(4.0, 1.0, size=(len(IDS), 3)))
    report = analyse(run, GapOptions(n_boot=50, low_langs=["hi"]))
    assert "--overwrite" in report.instrument.missing and report.rows
    with pytest.raises(UserError, match=r"hi\.h5|en\.h5") as err:
        analyse(run, GapOptions(stat="resid_norm", n_boot=50))
    assert "--overwrite" in str(err.value)


def test_a_language_cut_at_max_length_is_noted(tmp_path):
    run = controlled_run(tmp_path / "run", mass={"en": 1.0, "hi": 0.6}, norm={"en": 1.0, "hi": 0.7},
                         fve={"en": 0.9, "hi": 0.9})
    import h5py

    with h5py.File(run / "activations" / "hi.h5", "r+") as h5:
        h5.attrs["n_truncated"] = 3  # 3 of 40: above the 1 % threshold
    with h5py.File(run / "activations" / "en.h5", "r+") as h5:
        h5.attrs["n_truncated"] = 0
    notes = analyse(run, GapOptions(n_boot=50, low_langs=["hi"])).notes
    assert any(n.startswith("hi: 3 of 40 sentences were cut") for n in notes)
    assert not any(n.startswith("en:") for n in notes)
