"""What a newcomer sees: a default-style run's log is ours alone, its tables fit 80 columns, it ends with the
finding and the next command, and an unreachable hub costs one line."""

import io
import os
import socket
import subprocess
import sys

import pytest
from rich.console import Console

from jobs.extract import print_summary
from tests.conftest import ROOT
from toolkit.extraction import Summary

HEADERS = ("language", "sentences", "truncated", "tokens", "time", "tok/s", "file", "mean L0")


def render(summaries) -> list[str]:
    console = Console(width=80, record=True, file=io.StringIO())
    print_summary(summaries, console)
    return console.export_text().splitlines()


@pytest.mark.parametrize("skipped", [False, True])
def test_the_extraction_table_fits_80_columns_with_every_header_whole_and_no_empty_column(tmp_path, skipped):
    path = tmp_path / "hi.h5"
    path.write_bytes(b"x" * 3_456_789)
    rows = [
        Summary(lang, 1_012, 31_234, 123.4, path, 31.9, skipped=skipped and lang == "en", truncated=12)
        for lang in ("en", "zh", "ru", "es", "it", "id", "ca", "mr", "ml", "hi")
    ]
    lines = render(rows)
    assert max(len(line) for line in lines) <= 80
    header = next(line for line in lines if "language" in line)
    assert header.split() == [word for h in HEADERS for word in h.split()], header  # none cut, none empty
    assert "…" not in "\n".join(lines)
    body = [line for line in lines if line.startswith(" hi") or line.startswith("hi")]
    assert len(body[0].split()) == 10  # a value in every column ("123.4 s" and "3.3 MB" are two words each)
    assert ("done: finished by an earlier run" in "\n".join(lines)) == skipped


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`extract` as a newcomer runs it (SAE source auto, HF_HUB_OFFLINE unset, no hub), on the tiny model,
    its output captured as a log file would be."""
    run = tmp_path_factory.mktemp("newcomer") / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TQDM_", "TRANSFORMERS_"))}
    env |= {
        "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
        "LINGOGAP_CACHE": os.environ.get("LINGOGAP_CACHE", str(tmp_path_factory.getbasetemp() / "cache")),
        "COLUMNS": "80",
    }
    args = [
        sys.executable,
        "-m",
        "toolkit.submit",
        "extract",
        "--preset",
        "tiny",
        "--langs",
        "en,hi",
        "--layers",
        "0-5",
        "--sae",
        "auto",
        "--sae-release",
        "gemma-scope-2-270m-pt-res-all",
        "--sae-id",
        "layer_{i}_width_16k_l0_small",
        "--sae-train-tokens",
        "2000",
        "--max-sentences",
        "40",
        "--run",
        str(run),
    ]
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return run, out.stdout + out.stderr


def test_a_redirected_run_is_one_readable_log_without_third_party_output(default_run):
    _, log = default_run
    assert "\r" not in log and "\x1b" not in log and "[A" not in log  # no bar fragments, no escapes
    for noise in ("it/s", "Retrying", "Warning", "warn(", "Traceback", "%|"):
        assert noise not in log, noise
    lines = log.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("SAE layer ")] == [
        f"SAE layer {i}" for i in range(6)
    ]
    assert sum(line.lstrip().startswith(("en ", "hi ")) and "sentences" in line for line in lines) == 2


def test_an_unreachable_hub_is_one_line_naming_the_variable_and_the_fallback(default_run):
    _, log = default_run
    said = [line for line in log.splitlines() if "HF_HUB_OFFLINE" in line]
    assert len(said) == 1, log[:3000]
    text = " ".join(log.split())
    assert "HF_HUB_OFFLINE is unset" in text and "training small SAEs locally instead" in text


def test_the_run_ends_with_the_finding_the_next_command_and_where_the_time_went(default_run):
    run, log = default_run
    text = " ".join(log.split())
    assert "medium/low" in text and "in early layers" in text and "in deep layers" in text
    assert "early layers: SAE mass" in text and "deep layers: SAE mass" in text  # each band's control verdict
    assert "bootstrap resamples for the intervals" in text
    assert f"python -m toolkit.submit report --run {run}" in text
    last = log.strip().splitlines()[-1]
    assert last.startswith("time: model") and "SAEs" in last and "extraction" in last and "total" in last
