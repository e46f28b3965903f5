"""Helpers shared by the test tiers: the CLI as a user runs it, and an HDF5 file's datasets."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np

from tests.conftest import ROOT


def cli(*args: str, env: Mapping[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m toolkit.submit ARGS` from the project root, output captured."""
    return subprocess.run([sys.executable, "-m", "toolkit.submit", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=None if env is None else dict(env))


def h5_datasets(path: str | Path) -> dict[str, np.ndarray]:
    """Every dataset of an HDF5 file by its path inside the file, read whole."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as h5:
        h5.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out
