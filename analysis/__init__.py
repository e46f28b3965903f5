"""Offline analysis of finished activation runs: where languages get weaker SAE activity than English.

Reads HDF5 activation files through toolkit.store; needs h5py, numpy, rich and matplotlib only —
never torch or a model. Entry points:

    from analysis import GapOptions, analyse, write_report, render, run_report
    python -m analysis.gaps RUN_OR_FILES... [--out DIR]

Exports resolve lazily so that `python -m analysis.gaps` runs the module exactly once.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "analyse": "analysis.gaps",
    "GapOptions": "analysis.gaps",
    "write_report": "analysis.gaps",
    "run_report": "analysis.gaps",
    "LOW_LANGS": "analysis.gaps",
    "render": "analysis.terminal",
    "GapReport": "analysis.report",
    "GapRow": "analysis.report",
    "Headline": "analysis.report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
