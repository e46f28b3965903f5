"""setup.cfg is the package's configuration; pyproject.toml keeps only the build system and tools."""

import configparser
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_setup_cfg_declares_the_package():
    cfg = _setup_cfg()
    assert cfg["metadata"]["name"] == "lingogap"
    assert cfg["metadata"]["version"] == "attr: toolkit.__version__"
    requires = cfg["options"]["install_requires"].split()
    assert "torch>=2.4" in requires and "sae-lens>=6.0" in requires
    assert cfg["options.extras_require"]["cpu"].split() == ["torch==2.13.0"]
    assert "lingogap = toolkit.submit:main" in cfg["options.entry_points"]["console_scripts"]


def test_pyproject_keeps_only_the_build_system_and_tools():
    pyproject = _pyproject()
    assert set(pyproject) == {"build-system", "tool"}
    assert "setuptools" not in pyproject["tool"], "setuptools settings belong in setup.cfg"


def test_no_setting_is_declared_twice():
    package_sections = {"metadata", "options"}
    sections = _setup_cfg().sections()
    assert all(s.split(".")[0] in package_sections for s in sections), f"not package settings: {sections}"
    assert not {"project", "setuptools"} & (set(_pyproject()) | set(_pyproject()["tool"]))
