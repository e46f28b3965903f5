"""Helpers shared by the test tiers: the CLI as a user runs it (or its entry point in this process), and an HDF5
file's datasets."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import traceback
from collections.abc import Mapping
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import h5py
import numpy as np

from tests.conftest import ROOT


def cli(*args: str, env: Mapping[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m toolkit.submit ARGS` from the project root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "toolkit.submit", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else dict(env),
    )


def main(*args: str, columns: int = 200) -> subprocess.CompletedProcess:
    """The command's entry point, `toolkit.submit.main(ARGS)`, in this process: its exit code and output as a
    `cli` call gives them, without a new interpreter's seconds of imports. For cases about the message and the
    run folder, not the process; an escaping exception is printed into stderr as a command's traceback is."""
    from toolkit.submit import main as submit_main

    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, {"COLUMNS": str(columns)}), redirect_stdout(out), redirect_stderr(err):
        try:
            code = submit_main(list(args))
        except SystemExit as exc:  # argparse's refusals
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception:
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(["lingogap", *args], code, out.getvalue(), err.getvalue())


def h5_datasets(path: str | Path) -> dict[str, np.ndarray]:
    """Every dataset of an HDF5 file by its path inside the file, read whole."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as h5:
        h5.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out
