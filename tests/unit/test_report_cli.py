"""`toolkit.submit report` on a real tiny-preset run: extract three languages, then report."""

import json

from toolkit.submit import main


def test_report_stage_on_a_tiny_run(tmp_path, capsys):
    common = ["--preset", "tiny", "--run", str(tmp_path), "--langs", "en,hi,ml", "--max-sentences", "10",
              "--layers", "0-5"]
    assert main(["extract", *common]) == 0
    assert main(["report", *common, "--n-boot", "50", "--bands", "0-1,2-3,4-5"]) == 0
    reports = tmp_path / "reports"
    data = json.loads((reports / "gaps.json").read_text())
    rows = [r for r in data["rows"] if r["language"] != "en"]
    assert {r["language"] for r in rows} == {"hi", "ml"} and {r["layer"] for r in rows} == set(range(6))
    assert all(r["n"] == 10 for r in rows)
    header = (reports / "gaps.csv").read_text().splitlines()[0]
    assert header.startswith("language,layer,statistic,value,ci_low,ci_high,gap_pct,gap_parallel_pct,p_value,n")
    for name in ("gap_heatmap", "gap_lines", "overlap_heatmap"):
        assert (reports / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "hi" in (reports / "report.txt").read_text()
    assert "report" in json.loads((tmp_path / "manifest.json").read_text())["stages"]
