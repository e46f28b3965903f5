from pathlib import Path

import pytest

from tests.unit.evaluation.okapi_fixtures import write_fixture


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory) -> Path:
    return write_fixture(tmp_path_factory.mktemp("okapi"))
