"""The layer-range grammar: `--layers` selections and `--bands` ranges."""

import pytest

from toolkit.config import parse_layers as from_config
from toolkit.errors import UserError
from toolkit.layers import band_ranges, parse_layers


@pytest.mark.parametrize(
    "spec, n, expected",
    [("all", 4, [0, 1, 2, 3]), ("0-2,5", 8, [0, 1, 2, 5]), ("0-25:5", 26, [0, 5, 10, 15, 20, 25]),
     ("::6", 18, [0, 6, 12]), ("3", 4, [3]), ("10-", 12, [10, 11])],
)
def test_parse_layers(spec, n, expected):
    assert parse_layers(spec, n) == expected


@pytest.mark.parametrize("spec, message", [("0-30", "out of range"), ("a-b", "cannot parse"), ("5-2", "empty")])
def test_parse_layers_errors(spec, message):
    with pytest.raises(UserError, match=message):
        parse_layers(spec, 26)


def test_the_config_re_exports_the_one_parser():
    assert from_config is parse_layers


def test_band_ranges():
    assert band_ranges("0-8,9-17,18-25") == [(0, 8), (9, 17), (18, 25)]
    assert band_ranges("0, 1-2 ,3") == [(0, 0), (1, 2), (3, 3)]


@pytest.mark.parametrize("spec, message", [
    ("0-8,9-17", "three inclusive layer ranges"), ("0-8,9-x,18-25", "'9-x' is not a layer range"),
    ("0-8,5-17,18-25", "must not overlap"), ("8-0,9-17,18-25", "three inclusive"),
])
def test_band_range_errors(spec, message):
    with pytest.raises(UserError, match=message):
        band_ranges(spec)


def test_band_ranges_agree_with_the_analysis_bands():
    from analysis.bands import parse_bands

    spec = "0-8,9-17,18-25"
    bands = parse_bands(spec, range(26))
    assert [(b[0], b[-1]) for b in bands.values()] == band_ranges(spec)
