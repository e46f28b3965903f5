import pytest

from toolkit import languages
from toolkit.errors import UserError


def test_registry_has_the_ten_languages_with_tiers():
    assert list(languages.LANGUAGES) == ["en", "zh", "ru", "es", "it", "id", "ca", "mr", "ml", "hi"]
    assert [c for c, lang in languages.LANGUAGES.items() if lang.tier == "high"] == ["en", "zh", "ru", "es", "it"]
    assert [c for c, lang in languages.LANGUAGES.items() if lang.tier == "low"] == ["id", "ca", "mr", "ml", "hi"]
    assert languages.LANGUAGES["hi"].ntrex == "hin" and languages.LANGUAGES["ml"].flores == "mal_Mlym"
    assert languages.LANGUAGES["zh"].script == "Hans"


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("all", ["en", "zh", "ru", "es", "it", "id", "ca", "mr", "ml", "hi"]),
        ("high", ["en", "zh", "ru", "es", "it"]),
        ("low", ["en", "id", "ca", "mr", "ml", "hi"]),  # English added as the reference
        ("hi,en", ["en", "hi"]),
        ("ml", ["en", "ml"]),
        ("hi, ml ,hi", ["en", "ml", "hi"]),
    ],
)
def test_resolve(spec, expected):
    assert languages.resolve(spec) == expected


def test_resolve_without_reference():
    assert languages.resolve("low", with_reference=False) == ["id", "ca", "mr", "ml", "hi"]


@pytest.mark.parametrize("spec", ["xx", "en,xx", "", ","])
def test_unknown_or_empty_language_lists_valid_codes(spec):
    with pytest.raises(UserError, match="en, zh, ru, es, it, id, ca, mr, ml, hi"):
        languages.resolve(spec)
