import json
import re

import pytest

from toolkit import corpus
from toolkit.errors import HubUnreachable, UserError
from toolkit.languages import LANGUAGES

ALL = list(LANGUAGES)
SCRIPTS = {"zh": r"[\u4e00-\u9fff]", "ru": r"[\u0400-\u04ff]", "hi": r"[\u0900-\u097f]",
           "mr": r"[\u0900-\u097f]", "ml": r"[\u0d00-\u0d7f]"}


def test_embedded_corpus_is_parallel_varied_and_in_the_right_scripts():
    c = corpus.load("embedded", ALL)
    assert len(c.ids) >= 120 and len(set(c.ids)) == len(c.ids)
    for lang in ALL:
        assert len(c.texts[lang]) == len(c.ids)
        assert len(set(c.texts[lang])) == len(c.ids), f"{lang} repeats sentences"
        if lang in SCRIPTS:
            assert all(re.search(SCRIPTS[lang], t) for t in c.texts[lang]), lang
    from importlib import resources

    source = resources.files("toolkit") / "data" / "embedded.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    topics = {r["topic"] for r in rows}
    assert {"news", "science", "daily_life", "instructions", "questions"} <= topics
    lengths = [len(t.split()) for t in c.texts["en"]]
    assert min(lengths) < 10 < max(lengths), "sentence lengths should vary"


def test_max_sentences_takes_the_same_ids_in_every_language():
    c = corpus.load("embedded", ["en", "hi"], max_sentences=7)
    assert c.ids == corpus.load("embedded", ["en", "ml"]).ids[:7]
    assert len(c.texts["hi"]) == 7


def test_hashes_are_per_language_and_content_sensitive(tmp_path):
    for lang, lines in {"en": ["a", "b"], "hi": ["x", "y"]}.items():
        (tmp_path / f"{lang}.txt").write_text("\n".join(lines) + "\n")
    a = corpus.load(f"text:{tmp_path}", ["en", "hi"])
    (tmp_path / "hi.txt").write_text("x\nz\n")
    b = corpus.load(f"text:{tmp_path}", ["en", "hi"])
    assert a.lang_hash("en") == b.lang_hash("en") and a.lang_hash("hi") != b.lang_hash("hi")
    assert a.hash != b.hash


def test_ntrex_shared_layout(ntrex):
    c = corpus.load(f"ntrex:{ntrex}", ALL)
    assert len(c.ids) == 1997
    assert c.texts["en"][0] and c.texts["hi"][0] != c.texts["en"][0]


def test_ntrex_original_file_names(tmp_path):
    (tmp_path / "newstest2019-src.eng.txt").write_text("Hello.\nBye.\n")
    (tmp_path / "newstest2019-ref.hin.txt").write_text("नमस्ते।\nअलविदा।\n")
    c = corpus.load(f"ntrex:{tmp_path}", ["en", "hi"])
    assert c.texts["hi"] == ["नमस्ते।", "अलविदा।"] and c.ids == ["ntrex-00001", "ntrex-00002"]


def test_line_count_mismatch_names_both_files(tmp_path):
    (tmp_path / "en.txt").write_text("a\nb\nc\n")
    (tmp_path / "hi.txt").write_text("a\nb\n")
    with pytest.raises(UserError, match=r"hi\.txt has 2 lines but .*en\.txt has 3"):
        corpus.load(f"text:{tmp_path}", ["en", "hi"])


def test_empty_line_names_file_and_line(tmp_path):
    (tmp_path / "en.txt").write_text("a\n\nc\n")
    (tmp_path / "hi.txt").write_text("a\nb\nc\n")
    with pytest.raises(UserError, match=r"en\.txt:2: empty line"):
        corpus.load(f"text:{tmp_path}", ["en", "hi"])


def test_missing_language_file(tmp_path):
    (tmp_path / "en.txt").write_text("a\n")
    with pytest.raises(UserError, match="no Malayalam file"):
        corpus.load(f"text:{tmp_path}", ["en", "ml"])


def test_jsonl_loader_and_validation(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"id": "s1", "lang": "en", "text": "One."}, {"id": "s1", "lang": "hi", "text": "एक।"},
            {"id": "s2", "lang": "hi", "text": "दो।"}, {"id": "s2", "lang": "en", "text": "Two."}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    c = corpus.load(f"jsonl:{path}", ["en", "hi"])
    assert c.ids == ["s1", "s2"] and c.texts["hi"] == ["एक।", "दो।"]

    path.write_text("\n".join(json.dumps(r) for r in rows + [rows[0]]))
    with pytest.raises(UserError, match=r"c\.jsonl:5: duplicate id 's1' for language en"):
        corpus.load(f"jsonl:{path}", ["en", "hi"])

    path.write_text("\n".join(json.dumps(r) for r in rows[:3]))
    with pytest.raises(UserError, match="1 id\\(s\\) have no en text \\(first: 's2'\\)"):
        corpus.load(f"jsonl:{path}", ["en", "hi"])

    path.write_text('{"id": "s1", "lang": "en"}\n')
    with pytest.raises(UserError, match=r"c\.jsonl:1: expected"):
        corpus.load(f"jsonl:{path}", ["en"])

    with pytest.raises(UserError, match="has no sentences in Malayalam"):
        path.write_text("\n".join(json.dumps(r) for r in rows))
        corpus.load(f"jsonl:{path}", ["en", "ml"])


def test_flores_offline_names_the_alternative():
    with pytest.raises(HubUnreachable, match="ntrex:DIR"):
        corpus.load("flores", ["en", "hi"])


@pytest.mark.parametrize("spec, message", [("nope", "unknown corpus"), ("ntrex:", "needs a folder"),
                                           ("text:/does/not/exist", "is not a folder"),
                                           ("jsonl:/does/not/exist.jsonl", "no such file")])
def test_bad_specs(spec, message):
    with pytest.raises(UserError, match=message):
        corpus.load(spec, ["en"])
