"""Bad input as a user would type it: real commands on the tiny preset.

Every case must exit 2 with one `error:` line naming the problem, no traceback, and leave what was
already in the run folder untouched. `--dry-run` goes through the same config validation and corpus
loading as a real run, so it suffices where the error is raised there.
"""

import json
import re
from pathlib import Path

import pytest

from tests.helpers import cli

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")
) + "langs: *i\n"




def snapshot(root: Path) -> dict[str, bytes]:
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def jsonl(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)


GOOD_ROWS = [{"id": "a", "lang": "en", "text": "Hello."}, {"id": "a", "lang": "hi", "text": "नमस्ते।"}]


def write_inputs(tmp: Path, files: dict[str, bytes | str]) -> None:
    for name, content in files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


# (id, extra files under tmp, arguments with {tmp} and {run}, fragment of the error message)
CASES = [
    ("negative-layer", {}, ["--layers", "-1"], "layer ids are not negative"),
    ("reversed-range", {}, ["--layers", "5-2"], "reversed or empty range '5-2'"),
    ("zero-stride", {}, ["--layers", "::0"], "stride must be at least 1"),
    ("yaml-float-for-int", {"c.yaml": "sae: {width: 8.7}\n"}, ["--config", "{tmp}/c.yaml"],
     "sae.width must be an integer (got 8.7"),
    ("yaml-bool-for-int", {"c.yaml": "extract: {batch_tokens: true}\n"}, ["--config", "{tmp}/c.yaml"],
     "extract.batch_tokens must be an integer (got True"),
    ("yaml-string-for-bool", {"c.yaml": "extract: {save_resid: 'yes'}\n"}, ["--config", "{tmp}/c.yaml"],
     "extract.save_resid must be a boolean"),
    ("yaml-bool-for-string", {"c.yaml": "langs: no\n"}, ["--config", "{tmp}/c.yaml"], "run.langs must be a string"),
    ("yaml-inf", {"c.yaml": "sae: {lr: .inf}\n"}, ["--config", "{tmp}/c.yaml"], "sae.lr must be a finite number"),
    ("negative-lr", {}, ["--sae-lr", "-0.001"], "sae.lr must be a finite number greater than 0"),
    ("yaml-negative-align-lr", {"c.yaml": "align: {lr: -1}\n"}, ["--config", "{tmp}/c.yaml"], "align.lr"),
    ("l1-nan", {}, ["--sae-l1", "nan"], "sae.l1 must be a finite number"),
    ("yaml-alias-bomb", {"c.yaml": BOMB}, ["--config", "{tmp}/c.yaml"], "YAML aliases"),
    ("yaml-oversized", {"c.yaml": "langs: en\n" + "#" * (1 << 20) + "\n"}, ["--config", "{tmp}/c.yaml"],
     "at most 1,048,576 bytes"),
    ("yaml-not-utf8", {"c.yaml": b"langs: \xff\n"}, ["--config", "{tmp}/c.yaml"], "c.yaml:1 is not UTF-8"),
    ("jsonl-not-utf8", {"c.jsonl": jsonl(GOOD_ROWS[:1]) + b'{"id": "a", "lang": "hi", "text": "\xff"}\n'},
     ["--corpus", "jsonl:{tmp}/c.jsonl"], "c.jsonl:2: not UTF-8"),
    ("jsonl-non-string-text", {"c.jsonl": jsonl([*GOOD_ROWS[:1], {"id": "a", "lang": "hi", "text": 5}])},
     ["--corpus", "jsonl:{tmp}/c.jsonl"], "c.jsonl:2: text must be a string"),
    ("jsonl-non-string-lang", {"c.jsonl": jsonl([{"id": "a", "lang": ["en"], "text": "x"}])},
     ["--corpus", "jsonl:{tmp}/c.jsonl"], "c.jsonl:1: lang must be a string"),
    ("jsonl-lone-surrogate", {"c.jsonl": jsonl(GOOD_ROWS[:1]) + b'{"id": "a", "lang": "hi", "text": "\\ud800"}\n'},
     ["--corpus", "jsonl:{tmp}/c.jsonl"], "c.jsonl:2: text holds an invalid Unicode escape"),
    ("text-not-utf8", {"txt/en.txt": "Hello.\n", "txt/hi.txt": b"ok\n\xc3\x28\n"}, ["--corpus", "text:{tmp}/txt"],
     "hi.txt:2: not UTF-8"),
    ("run-is-a-file", {}, ["--run", "{tmp}/runfile"], "is a file, not a folder"),
    ("unknown-language", {}, ["--langs", "en,xx"], "unknown language code 'xx'"),
    ("more-shards-than-sentences", {}, ["--shards", "3"], "extract.shards: 3 shards for 2 sentences"),
    ("yaml-duplicate-key", {"c.yaml": "langs: en,hi\nseed: 1\nlangs: en\n"}, ["--config", "{tmp}/c.yaml"],
     "c.yaml:3: duplicate key 'langs' (first on line 1)"),
    ("yaml-duplicate-section", {"c.yaml": "extract:\n  batch_tokens: 512\nsae:\n  width: 64\nextract:\n"
                                          "  code_dtype: float32\n"}, ["--config", "{tmp}/c.yaml"],
     "c.yaml:5: duplicate key 'extract' (first on line 1)"),
    ("yaml-duplicate-nested", {"c.yaml": "sae:\n  width: 64\n  lr: 0.01\n  width: 32\n"}, ["--config", "{tmp}/c.yaml"],
     "c.yaml:4: duplicate key 'width' (first on line 2)"),
    ("yaml-duplicate-flow", {"c.yaml": "sae: {width: 64, width: 32}\n"}, ["--config", "{tmp}/c.yaml"],
     "c.yaml:1: duplicate key 'width'"),
    ("yaml-is-a-folder", {"cfg/x.yaml": "langs: en\n"}, ["--config", "{tmp}/cfg"], "is a folder, not a YAML file"),
    ("target-l0-above-width", {}, ["--sae-target-l0", "500"], "sae.target_l0 (500) asks for more active features"),
    ("default-l0-above-width", {}, ["--sae-width", "16"], "sae.target_l0 (0, the quick budget's 32) asks for more"),
]


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "real"])
@pytest.mark.parametrize("files, args, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error(tmp_path, files, args, message, dry_run):
    if not dry_run and "--corpus" in args:
        pytest.skip("a corpus is read by the job; the real run is covered by the config cases")
    write_inputs(tmp_path, files)
    run = tmp_path / "run"
    (run / "activations").mkdir(parents=True)
    (run / "keep.txt").write_text("earlier output\n")
    (run / "activations" / "en.h5").write_bytes(b"not touched")
    (tmp_path / "runfile").write_text("a file, not a run folder\n")
    before = {p: snapshot(p) for p in (run, tmp_path / "runfile")}
    argv = [a.format(tmp=tmp_path, run=run) for a in args]
    if "--run" not in argv:
        argv += ["--run", str(run)]
    out = cli("extract", "--preset", "tiny", "--langs", "en,hi", "--max-sentences", "2", *argv,
              *(["--dry-run"] if dry_run else []))
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert out.stderr.count("error:") == 1 and message in " ".join(out.stderr.split()), out.stderr
    assert {p: snapshot(p) for p in before} == before


@pytest.mark.parametrize("args", [["--shards", "3"], ["--model", "/nowhere/model"]],
                         ids=["before-the-job", "in-the-job"])
def test_a_refused_command_creates_no_run_folder(tmp_path, args):
    out = cli("extract", "--preset", "tiny", "--langs", "en,hi", "--max-sentences", "2", *args,
              "--run", str(tmp_path / "run"))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()


def test_bom_is_stripped_with_a_warning(tmp_path):
    from toolkit import corpus

    text = {"en": "Hello world.", "hi": "नमस्ते दुनिया।"}
    folder = tmp_path / "txt"
    folder.mkdir()
    for lang, sentence in text.items():
        (folder / f"{lang}.txt").write_bytes(b"\xef\xbb\xbf" + sentence.encode() + b"\n")
    out = cli("extract", "--preset", "tiny", "--langs", "en,hi", "--corpus", f"text:{folder}",
              "--run", str(tmp_path / "run"), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "en.txt starts with a UTF-8 byte-order mark; it was removed" in " ".join(out.stderr.split())
    # The tiny tokenizer has one token per byte: a kept BOM would add three.
    tokens = re.search(r"en\s*│\s*1\s*│\s*([\d,]+)", out.stdout)
    assert tokens and int(tokens.group(1)) == len(text["en"].encode()), out.stdout
    with pytest.warns(UserWarning, match="byte-order mark"):
        loaded = corpus.load(f"text:{folder}", ["en", "hi"])
    assert loaded.texts == {lang: [sentence] for lang, sentence in text.items()}
