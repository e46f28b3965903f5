"""What the cluster tests share: the tiny extraction flags, this side's versions, a tiny config."""

from __future__ import annotations

from pathlib import Path

from toolkit.cluster.container import local_versions
from toolkit.config import Config

TINY = ["--preset", "tiny", "--langs", "en,hi", "--max-sentences", "2", "--layers", "0-1", "--sae", "random"]
HERE = local_versions()


def cfg_of(tmp_path: Path, **run) -> Config:
    return Config.build({"run": {"preset": "tiny", "langs": "en,hi", "run": str(tmp_path / "run"), **run}})
