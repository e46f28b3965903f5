"""Apptainer: the command line and its binds, the job environment, the definition file, and the version check
(with the FAKE `apptainer` of `fake_bin`, see conftest.py)."""

from __future__ import annotations

import json
import os
import shlex

import pytest
from rich.console import Console

from tests.conftest import ROOT
from tests.unit.cluster.common import HERE, cfg_of
from toolkit.cluster.chain import absolute
from toolkit.cluster.container import (
    DEF_FILE,
    apptainer_python,
    bind_paths,
    check_container,
    check_definition,
    definition_sections,
    setup_lines,
    version_mismatches,
)
from toolkit.cluster.job import StageJob
from toolkit.cluster.profile import Container
from toolkit.errors import UserError


def test_apptainer_command_line_binds_run_cache_hf_home_and_data(tmp_path, monkeypatch):
    monkeypatch.setenv("LINGOGAP_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "data" / "corpus"
    corpus.mkdir(parents=True)
    cfg = absolute(cfg_of(tmp_path, corpus=f"text:{corpus}"))
    container = Container(binds=["/scratch"], options=["--cleanenv"])
    words = shlex.split(apptainer_python(container, "/images/lingogap.sif",
                                                 bind_paths(cfg, container)))
    assert words[:3] == ["apptainer", "exec", "--nv"] and "--cleanenv" in words
    assert words[-2:] == ["/images/lingogap.sif", "python"]
    binds = words[words.index("--bind") + 1].split(",")
    assert binds == [str(tmp_path / "run"), str(tmp_path / "cache"), str(tmp_path / "hf"), str(corpus), "/scratch"]
    plain = apptainer_python(Container(nv=False), "/i.sif", [])
    assert plain == "apptainer exec /i.sif python"


def test_job_environment_lines(tmp_path, monkeypatch):
    monkeypatch.setenv("LINGOGAP_CACHE", str(tmp_path / "cache"))
    cfg = cfg_of(tmp_path)
    inside = setup_lines(cfg, containerised=True)
    assert "export HDF5_USE_FILE_LOCKING=FALSE" in inside
    assert f"export LINGOGAP_CACHE={tmp_path / 'cache'}" in inside and f"export HF_HOME={tmp_path / 'hf'}" in inside
    assert not any("PYTHONPATH" in line for line in inside)  # the image has its own toolkit
    outside = setup_lines(cfg, containerised=False)
    assert any(line.startswith(f"export PYTHONPATH={ROOT}") for line in outside)  # this checkout is not installed


def test_definition_file_is_valid():
    text = DEF_FILE.read_text()
    assert check_definition(text) == []
    header, sections = definition_sections(text)
    assert header["Bootstrap"] == "docker" and ("cuda" in header["From"] or "pytorch" in header["From"])
    assert f"torch=={_version('torch').split('+')[0]}" in sections["%post"]
    for line in sections["%post"].split("<<'EOF'")[1].split("EOF")[0].strip().splitlines():
        assert "==" in line, f"unpinned dependency in %post: {line}"
    assert 'python -m toolkit.submit "$@"' in sections["%runscript"]


def _version(name: str) -> str:
    from importlib import metadata

    return metadata.version(name)


@pytest.mark.parametrize("change, problem", [
    (lambda t: t.replace("%test", "%tset"), "section %test is missing"),
    (lambda t: t.replace("%labels", "%label"), "section %labels is missing"),
    (lambda t: t.replace("Bootstrap: docker", "Bootstrap: library"), "Bootstrap: docker"),
    (lambda t: t.replace("From: nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04", "From: nvidia/cuda:latest"),
     "pinned image tag"),
    (lambda t: t.replace('python -m toolkit.submit "$@"', "python -m toolkit.submit"), "%runscript"),
    (lambda t: t.replace(f"submitit=={HERE['submitit']}", "submitit"), f"pin submitit=={HERE['submitit']}"),
    (lambda t: t.replace(f"CLOUDPICKLE_VERSION {HERE['cloudpickle']}", "CLOUDPICKLE_VERSION 2.0.0"),
     "CLOUDPICKLE_VERSION"),
])
def test_definition_file_problems_are_found(change, problem):
    problems = check_definition(change(DEF_FILE.read_text()))
    assert any(problem in p for p in problems), problems


def test_definition_must_match_the_submitting_side():
    other = {**HERE, "python": "3.12", "submitit": "9.9.9"}
    problems = check_definition(DEF_FILE.read_text(), other)
    assert any("Python 3.12" in p for p in problems) and any("submitit==9.9.9" in p for p in problems)


def test_version_mismatches():
    assert version_mismatches(HERE, dict(HERE)) == []
    wrong = version_mismatches(HERE, {**HERE, "cloudpickle": "2.2.1"})
    assert wrong == [f"cloudpickle: {HERE['cloudpickle']} on the submitting side, 2.2.1 in the image"]


def test_image_with_other_versions_is_refused(fake_bin, tmp_path, monkeypatch):
    image = tmp_path / "lingogap.sif"
    image.write_bytes(b"not really an image")
    console = Console(file=open(os.devnull, "w"))
    check_container(Container(), str(image), console)  # the fake reports equal versions
    monkeypatch.setenv("FAKE_APPTAINER_REPORT", json.dumps({**HERE, "python": "3.10", "cloudpickle": "2.2.1"}))
    with pytest.raises(UserError) as err:
        check_container(Container(), str(image), console)
    text = str(err.value)
    assert f"python: {HERE['python']} on the submitting side, 3.10 in the image" in text
    assert "cloudpickle" in text and "submitit:" not in text and "Apptainer.def" in text
    monkeypatch.setenv("FAKE_APPTAINER_REPORT", "")  # an image whose python prints nothing
    with pytest.raises(UserError, match="cannot run its python"):
        check_container(Container(), str(image), console)
    with pytest.raises(UserError, match="no such image"):
        check_container(Container(), str(tmp_path / "missing.sif"), console)


def test_without_apptainer_the_check_is_left_to_the_job(tmp_path, capsys):
    image = tmp_path / "lingogap.sif"
    image.write_bytes(b"x")
    console = Console(stderr=True)
    check_container(Container(apptainer=str(tmp_path / "no-apptainer")), str(image), console)
    assert "cannot be checked before submitting" in capsys.readouterr().err


def test_a_job_refuses_a_runtime_with_other_versions(tmp_path):
    job = StageJob(cfg_of(tmp_path), "report", versions={**HERE, "cloudpickle": "0.1"})
    with pytest.raises(RuntimeError, match="cloudpickle: 0.1 on the submitting side"):
        job()
