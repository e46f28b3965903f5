"""The language registry: one line per language, with the codes each corpus and benchmark uses."""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.errors import UserError

REFERENCE = "en"


@dataclass(frozen=True)
class Language:
    code: str  # ours, ISO 639-1
    name: str
    script: str  # ISO 15924
    tier: str  # "high" or "low" (medium and low resource, the paper's second group)
    ntrex: str  # NTREX-128 file suffix: newstest2019-ref.{ntrex}.txt
    flores: str  # FLORES+ config name
    okapi: str  # Okapi / lm-eval multilingual task suffix


LANGUAGES: dict[str, Language] = {
    lang.code: lang
    for lang in [
        Language("en", "English", "Latn", "high", "eng", "eng_Latn", "en"),
        Language("zh", "Chinese", "Hans", "high", "zho-CN", "cmn_Hans", "zh"),
        Language("ru", "Russian", "Cyrl", "high", "rus", "rus_Cyrl", "ru"),
        Language("es", "Spanish", "Latn", "high", "spa", "spa_Latn", "es"),
        Language("it", "Italian", "Latn", "high", "ita", "ita_Latn", "it"),
        Language("id", "Indonesian", "Latn", "low", "ind", "ind_Latn", "id"),
        Language("ca", "Catalan", "Latn", "low", "cat", "cat_Latn", "ca"),
        Language("mr", "Marathi", "Deva", "low", "mar", "mar_Deva", "mr"),
        Language("ml", "Malayalam", "Mlym", "low", "mal", "mal_Mlym", "ml"),
        Language("hi", "Hindi", "Deva", "low", "hin", "hin_Deva", "hi"),
    ]
}

GROUPS = {
    "all": lambda lang: True,
    "high": lambda lang: lang.tier == "high",
    "low": lambda lang: lang.tier == "low",
}


def resolve(spec: str | list[str] | tuple[str, ...], with_reference: bool = True) -> list[str]:
    """Expand `all`, `high`, `low` or a comma list into registry codes, English first.

    English is added whenever `with_reference` is set, since every gap is measured against it.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    codes: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        if item in GROUPS:
            codes += [c for c, lang in LANGUAGES.items() if GROUPS[item](lang)]
        elif item in LANGUAGES:
            codes.append(item)
        else:
            raise UserError(
                f"unknown language code {item!r}; valid codes: {', '.join(LANGUAGES)} "
                f"(or the groups {', '.join(GROUPS)})"
            )
    if not codes:
        raise UserError(f"no languages selected; use codes from {', '.join(LANGUAGES)} or all/high/low")
    if with_reference and REFERENCE not in codes:
        codes.insert(0, REFERENCE)
    ordered = [c for c in LANGUAGES if c in codes]
    return ordered
