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


# Heaviest first, so that neither of the two workers is left with a long test at the end: the cluster and
# embedded-model tiers, then files sharing a built fixture, then the rest (in collection order within each).
_FIRST = ("cluster", "integration")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """With `--dist loadgroup`: the tests sharing a module- or package-scoped fixture run on one worker, which
    builds it once (under `--dist load` each worker would build it again); order the work heaviest first."""
    for item in items:
        group = _shared_fixture_group(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: (not any(item.get_closest_marker(m) for m in _FIRST),
                                 item.get_closest_marker("xdist_group") is None))


def _shared_fixture_group(item) -> str | None:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    for name in info.names_closure:
        for fixturedef in info.name2fixturedefs.get(name, ()):
            if fixturedef.scope == "package":
                return fixturedef.baseid or "tests"
            if fixturedef.scope == "module":
                return item.nodeid.split("::")[0]
    return None
