"""Shared test setup: offline, single-threaded, a private model cache, and the shared data."""

import os

# Before torch is imported anywhere: 2 threads on 2 cores made training steps 10-30x slower.
for key, value in {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}.items():
    os.environ.setdefault(key, value)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def shared_data() -> Path | None:
    path = Path(os.environ.get("TOOLKIT_SHARED_DATA", ROOT.parent / "shared" / "data"))
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_data()
    if path is None:
        pytest.skip("shared test data not found (set TOOLKIT_SHARED_DATA or place it at ../shared/data)")
    return path


@pytest.fixture(scope="session")
def ntrex(shared) -> Path:
    path = shared / "ntrex128"
    if not (path / "en.txt").is_file():
        pytest.skip(f"NTREX-128 not found under {path}")
    return path


@pytest.fixture(scope="session")
def okapi(shared) -> Path:
    path = shared / "okapi"
    if not (path / "arc_challenge" / "en_test.json").is_file():
        pytest.skip(f"Okapi benchmark files not found under {path}")
    return path


@pytest.fixture(scope="session")
def tiny_lm():
    from toolkit.config import ModelConfig
    from toolkit.models import load

    return load(ModelConfig(name="tiny"))


@pytest.fixture(scope="session")
def embedded_lm():
    from toolkit.config import ModelConfig
    from toolkit.models import load

    return load(ModelConfig(name="embedded"))


# The scheduler (`-n auto`): each file goes to one worker whole (its module and package fixtures built once, its
# tests in order; a cluster file one test at a time), except these files of independent long tests, sent test
# by test so both workers share them.
SPLIT = {
    "tests/integration/test_align_embedded.py",
    "tests/integration/test_evaluation_embedded.py",
    "tests/unit/test_benchmark_quick.py",
    "tests/unit/test_faults.py",
}
# Heaviest first (pyproject's --no-loadscope-reorder keeps this order), so that neither worker is left with a long
# test at the end: the cluster and embedded-model tiers, then the rest in collection order.
FIRST = ("cluster", "integration")


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class Scheduler(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::")[0]
            return nodeid if path in SPLIT else path

    return Scheduler(config, log)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not any(item.get_closest_marker(m) for m in FIRST))
