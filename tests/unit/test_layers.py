"""The layer-range grammar: `--layers` selections and `--bands` ranges."""

import pytest

from toolkit.config import Config
from toolkit.config import parse_layers as from_config
from toolkit.errors import UserError
from toolkit.layers import aligned_layers, band_ranges, parse_layers


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


@pytest.mark.parametrize("n, last", [(18, 14), (26, 21), (12, 9), (2, 0), (1, 0)])
def test_auto_alignment_layers_leave_out_the_last_sixth(n, last):
    assert aligned_layers("auto", n) == list(range(last + 1))
    assert aligned_layers(" 0-2,5 ", n + 6) == parse_layers("0-2,5", n + 6)


def test_auto_is_the_alignment_default_and_only_alignment_reads_it():
    assert Config.build({}).align.align_layers == "auto"
    assert Config.build({"align": {"align_layers": "all"}}).align.align_layers == "all"
    with pytest.raises(UserError, match="run.layers: cannot parse 'auto'"):
        Config.build({"run": {"layers": "auto"}})


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
