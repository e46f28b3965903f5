"""analysis.compare on tiny runs: shared languages and layers, sign agreement, profiles, files, torch-free."""

import json
import subprocess
import sys

import pytest

from analysis import compare
from jobs import extract, report
from tests.conftest import ROOT
from toolkit.config import Config


def tiny_run(run, seed: int, langs: str, layers: str) -> None:
    cfg = Config.build({"run": {"run": str(run), "langs": langs, "layers": layers, "max_sentences": 20,
                                "seed": seed}, "sae": {"source": "random"}}, preset="tiny")
    extract.run(cfg)
    report.run(cfg)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    tiny_run(root / "a", 0, "en,hi,ml,zh", "0-8")
    tiny_run(root / "b", 1, "en,hi,ml,zh", "0-8")
    tiny_run(root / "c", 2, "en,hi,ml", "0-5")
    return root


def test_two_runs_compare_per_language_and_band(runs):
    c = compare.compare([compare.load_run(runs / "a"), compare.load_run(runs / "b")])
    assert c.languages == ["hi", "ml", "zh"] and c.layers == list(range(9))
    assert {(r.language, r.band) for r in c.rows} == {
        (lang, band) for lang in ("hi", "ml", "zh", compare.GROUP) for band in ("early", "middle", "deep")}
    for row in c.rows:
        assert [g.run for g in row.gaps] == ["a", "b"]
        assert all(g.ci_low <= g.gap <= g.ci_high for g in row.gaps)
        signs = {g.gap > 0 for g in row.gaps}
        assert row.agree == (len(signs) == 1) and (not row.robust or row.agree)
    assert {p.language for p in c.profiles} == {"hi", "ml", "zh", compare.GROUP}
    assert all(-1 <= p.pearson <= 1 and p.n_layers == 9 for p in c.profiles)
    names = {(h.name, h.measure) for h in c.headlines}
    assert (compare.GROUP, "early_min_gap") in names and (compare.GROUP, "deep_mean_gap") in names


def test_a_run_compared_with_itself_agrees_everywhere(runs):
    c = compare.compare([compare.load_run(runs / "a"), compare.load_run(runs / "a")])
    assert all(r.agree for r in c.rows if r.gaps[0].gap != 0)
    assert all(p.pearson == pytest.approx(1.0) for p in c.profiles)
    assert [r.name for r in c.runs] == ["1:a", "2:a"]


def test_runs_with_other_layers_and_languages_compare_on_what_they_share(runs):
    c = compare.compare([compare.load_run(runs / p) for p in ("a", "b", "c")])
    assert c.languages == ["hi", "ml"] and c.layers == list(range(6))
    assert c.skipped["a"] == {"languages": ["zh"], "layers": [6, 7, 8]} and c.skipped["c"] == {
        "languages": [], "layers": []}
    assert {(p.run_a, p.run_b) for p in c.profiles} == {("a", "b"), ("a", "c"), ("b", "c")}


def test_cli_writes_json_and_figure_and_names_what_it_skipped(runs, tmp_path):
    out = tmp_path / "cmp"
    done = subprocess.run([sys.executable, "-m", "analysis.compare", str(runs / "a"), str(runs / "c"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "skipped" in done.stdout and "zh" in done.stdout and "6-8" in done.stdout
    body = json.loads((out / "compare.json").read_text())
    assert body["format"] == "lingogap-compare" and body["skipped"]["a"]["languages"] == ["zh"]
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_writes_into_the_first_runs_reports_by_default(runs, tmp_path):
    done = subprocess.run([sys.executable, "-m", "analysis.compare", str(runs / "a"), str(runs / "b")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (runs / "a" / "reports" / "compare" / "compare.json").is_file()
    assert not (tmp_path / "compare").exists()


def test_a_missing_report_names_the_fix(tmp_path):
    code = compare.main([str(tmp_path), str(tmp_path)])
    assert code == 2


def test_compare_never_imports_torch():
    code = "import sys, analysis.compare; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_report_compare_sets_the_run_beside_others(runs):
    cfg = Config.build({"run": {"run": str(runs / "a"), "langs": "en,hi,ml,zh", "layers": "0-8", "max_sentences": 20},
                        "sae": {"source": "random"}, "report": {"compare": f"{runs / 'b'},{runs / 'c'}"}},
                       preset="tiny")
    report.run(cfg)
    saved = json.loads((runs / "a" / "reports" / "compare" / "compare.json").read_text())
    assert [r["name"] for r in saved["runs"]] == ["a", "b", "c"]
    assert saved["languages"] == ["hi", "ml"] and (runs / "a" / "reports" / "compare" / "compare.png").is_file()
