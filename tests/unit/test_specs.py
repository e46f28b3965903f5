"""Corpus and SAE options parsed once into typed values: kind, argument, the paths a container must bind."""

from pathlib import Path

import pytest

from toolkit.corpus import CorpusSpec
from toolkit.errors import UserError
from toolkit.sae_source import SAESource


@pytest.mark.parametrize("spec, kind, arg, paths", [
    ("embedded", "embedded", "", []), ("flores", "flores", "", []), ("flores:dev", "flores", "dev", []),
    ("text:/data/c", "text", "/data/c", [Path("/data/c")]), ("ntrex:/d/n", "ntrex", "/d/n", [Path("/d/n")]),
    ("jsonl:/d/x.jsonl", "jsonl", "/d/x.jsonl", [Path("/d")]), ("", "", "", []),
])
def test_corpus_specs(spec, kind, arg, paths):
    parsed = CorpusSpec.parse(spec)
    assert (parsed.kind, parsed.arg, parsed.paths) == (kind, arg, paths)
    assert str(parsed) == spec and CorpusSpec.parse(parsed) is parsed


def test_corpus_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert CorpusSpec.parse("text:c").absolute() == CorpusSpec("text", str(tmp_path / "c"))
    assert CorpusSpec.parse("jsonl:x.jsonl").absolute().arg == str(tmp_path / "x.jsonl")
    assert CorpusSpec.parse("flores:dev").absolute() == CorpusSpec("flores", "dev")


def test_missing_corpus_inputs_are_named(tmp_path):
    with pytest.raises(UserError, match="run.corpus: .* is not a folder"):
        CorpusSpec.parse(f"text:{tmp_path / 'gone'}").check("run.corpus")
    with pytest.raises(UserError, match="sae.train_corpus: .* is not a file"):
        CorpusSpec.parse(f"jsonl:{tmp_path / 'x.jsonl'}").check("sae.train_corpus")
    CorpusSpec.parse("").check("sae.train_corpus")  # no corpus of its own: nothing to check


def test_corpus_load_takes_a_spec_or_a_string():
    from toolkit.corpus import load

    assert load(CorpusSpec("embedded"), ["en", "hi"], 3).ids == load("embedded", ["en", "hi"], 3).ids
    with pytest.raises(UserError, match="unknown corpus 'nope:x'"):
        load(CorpusSpec("nope", "x"), ["en"])


@pytest.mark.parametrize("spec, kind, arg, paths", [
    ("auto", "auto", "", []), ("train", "train", "", []), ("random", "random", "", []),
    ("pretrained:gemma-scope", "pretrained", "gemma-scope", []), ("dir:/s", "dir", "/s", [Path("/s")]),
])
def test_sae_sources(spec, kind, arg, paths):
    parsed = SAESource.parse(spec)
    assert (parsed.kind, parsed.arg, parsed.paths, str(parsed)) == (kind, arg, paths, spec)


def test_sae_directories_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert SAESource.parse("dir:saes").absolute() == SAESource("dir", str(tmp_path / "saes"))
    assert SAESource.parse("train").absolute() == SAESource("train")
