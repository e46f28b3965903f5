"""Parallel corpora: every loader returns the same sentence ids in every language, in one order.

Gaps are only meaningful on parallel text, so misalignment is an error, never silently repaired.
Specs: `embedded`, `ntrex:DIR`, `flores[:dev|devtest]`, `text:DIR`, `jsonl:FILE`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from toolkit.errors import HubUnreachable, UserError
from toolkit.languages import LANGUAGES
from toolkit.spec import KindSpec


@dataclass
class Corpus:
    name: str
    ids: list[str]
    texts: dict[str, list[str]]  # language -> sentences, aligned with ids

    def __post_init__(self) -> None:
        for lang, texts in self.texts.items():
            assert len(texts) == len(self.ids), f"{self.name}: {lang} is not aligned"

    @property
    def langs(self) -> list[str]:
        return list(self.texts)

    def sentences(self, lang: str) -> list[tuple[str, str]]:
        return list(zip(self.ids, self.texts[lang]))

    def lang_hash(self, lang: str) -> str:
        """Content hash of one language's side, so adding a language leaves others' files valid."""
        h = hashlib.sha256()
        for sid, text in self.sentences(lang):
            h.update(f"{sid}\t{text}\n".encode())
        return h.hexdigest()[:16]

    @property
    def hash(self) -> str:
        return hashlib.sha256("".join(self.lang_hash(lang) for lang in sorted(self.texts)).encode()).hexdigest()[:16]

    def head(self, n: int) -> Corpus:
        if not n or n >= len(self.ids):
            return self
        return Corpus(self.name, self.ids[:n], {lang: t[:n] for lang, t in self.texts.items()})

    def subset(self, ids: list[str]) -> Corpus:
        index = {sid: i for i, sid in enumerate(self.ids)}
        rows = [index[sid] for sid in ids]
        return Corpus(self.name, list(ids), {lang: [t[i] for i in rows] for lang, t in self.texts.items()})


@dataclass(frozen=True)
class CorpusSpec(KindSpec):
    """A corpus option (`--corpus`, `--sae-train-corpus`) parsed once: `kind` and its argument.

    Kinds: `embedded`, `ntrex:DIR`, `flores[:dev|devtest]`, `text:DIR`, `jsonl:FILE`; `load` checks them.
    An empty spec (no training corpus of its own) has kind "".
    """

    @property
    def paths(self) -> list[Path]:
        """Local paths a job reads (a container must bind them): the folder of text/ntrex, a jsonl's folder."""
        if not self.arg:
            return []
        if self.kind in ("text", "ntrex"):
            return [Path(self.arg)]
        return [Path(self.arg).parent] if self.kind == "jsonl" else []

    def absolute(self) -> CorpusSpec:
        """The same spec with its local path absolute, so a job finds it from any working directory."""
        if self.kind in ("text", "ntrex", "jsonl") and self.arg:
            return CorpusSpec(self.kind, str(Path(self.arg).expanduser().resolve()))
        return self

    def check(self, name: str) -> None:
        """Fail when the local input is missing (before anything is submitted); `name` is the option."""
        if self.kind in ("text", "ntrex") and self.arg and not Path(self.arg).is_dir():
            raise UserError(f"{name}: {self.arg} is not a folder")
        if self.kind == "jsonl" and not Path(self.arg).is_file():
            raise UserError(f"{name}: {self.arg} is not a file")


def load(spec: str | CorpusSpec, langs: list[str], max_sentences: int = 0) -> Corpus:
    """Load `spec` for `langs`; `max_sentences` keeps the same first N ids in every language."""
    parsed = CorpusSpec.parse(spec)
    kind, arg = parsed.kind, parsed.arg
    spec = spec if isinstance(spec, str) else str(spec)
    if kind == "embedded":
        corpus = _embedded(langs)
    elif kind == "ntrex":
        corpus = _line_aligned(_need_dir(spec, arg), langs, "ntrex", ntrex=True)
    elif kind == "text":
        corpus = _line_aligned(_need_dir(spec, arg), langs, "text")
    elif kind == "jsonl":
        corpus = _jsonl(Path(arg), langs)
    elif kind == "flores":
        corpus = _flores(langs, arg or "devtest")
    else:
        raise UserError(f"run.corpus: unknown corpus {spec!r}; use embedded, ntrex:DIR, flores, text:DIR or jsonl:FILE")
    return corpus.head(max_sentences)


def _need_dir(spec: str, arg: str) -> Path:
    if not arg:
        raise UserError(f"run.corpus: {spec!r} needs a folder, e.g. {spec.rstrip(':')}:/data/ntrex128")
    path = Path(arg).expanduser()
    if not path.is_dir():
        raise UserError(f"run.corpus: {path} is not a folder")
    return path


def _embedded(langs: list[str]) -> Corpus:
    ids: list[str] = []
    texts: dict[str, list[str]] = {lang: [] for lang in langs}
    source = resources.files("toolkit") / "data" / "embedded.jsonl"
    for n, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        row = json.loads(line)
        missing = [lang for lang in langs if not row["text"].get(lang)]
        if missing:
            raise UserError(f"embedded corpus line {n} ({row['sid']}) has no {', '.join(missing)} text")
        ids.append(row["sid"])
        for lang in langs:
            texts[lang].append(row["text"][lang])
    return Corpus("embedded", ids, texts)


def _line_aligned(folder: Path, langs: list[str], name: str, ntrex: bool = False) -> Corpus:
    files = {lang: _find_lang_file(folder, lang, ntrex) for lang in langs}
    lines = {lang: _read_lines(path) for lang, path in files.items()}
    ref = langs[0]
    for lang in langs[1:]:
        if len(lines[lang]) != len(lines[ref]):
            raise UserError(
                f"misaligned corpus: {files[lang]} has {len(lines[lang])} lines but {files[ref]} has "
                f"{len(lines[ref])}; line-aligned files must have one line per sentence in every language"
            )
    ids = [f"{name}-{i:05d}" for i in range(1, len(lines[ref]) + 1)]
    return Corpus(f"{name}:{folder.resolve()}", ids, lines)


def _find_lang_file(folder: Path, lang: str, ntrex: bool) -> Path:
    candidates = [folder / f"{lang}.txt"]
    if ntrex:
        code = LANGUAGES[lang].ntrex
        candidates += [folder / f"newstest2019-ref.{code}.txt", folder / f"newstest2019-src.{code}.txt"]
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(f"corpus has no {LANGUAGES[lang].name} file: none of {', '.join(str(p) for p in candidates)}")


_UTF8_BOM = b"\xef\xbb\xbf"


def _read_text(path: Path) -> str:
    """A corpus file as text: invalid UTF-8 names the line; a byte-order mark is dropped with a warning."""
    import warnings

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if raw.startswith(_UTF8_BOM):
        # Kept, the mark would become the first sentence's first tokens (three with a byte-level tokenizer).
        warnings.warn(f"{path} starts with a UTF-8 byte-order mark; it was removed", stacklevel=2)
        raw = raw[len(_UTF8_BOM):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x}); save the file as UTF-8") from None


def _read_lines(path: Path) -> list[str]:
    lines = _read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise UserError(f"{path}:{n}: empty line; every line must hold one sentence (the files are line-aligned)")
    return [line.strip() for line in lines]


def _jsonl_row(path: Path, n: int, line: str) -> tuple[str, str, str]:
    """(id, lang, text) of one jsonl line, or a UserError naming the file, the line and the field."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f'{path}:{n}: not JSON ({exc.msg}); expected {{"id": ..., "lang": ..., "text": ...}}') from None
    if not isinstance(row, dict) or not {"id", "lang", "text"} <= row.keys():
        raise UserError(f'{path}:{n}: expected {{"id": ..., "lang": ..., "text": ...}}')
    sid, lang, text = row["id"], row["lang"], row["text"]
    if isinstance(sid, bool) or not isinstance(sid, (str, int)):
        raise UserError(f"{path}:{n}: id must be a string or an integer (got {sid!r})")
    for field, value in (("lang", lang), ("text", text)):
        if not isinstance(value, str):
            raise UserError(f"{path}:{n}: {field} must be a string (got {value!r})")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
            raise UserError(f"{path}:{n}: {field} holds an invalid Unicode escape") from None
    if not text.strip():
        raise UserError(f"{path}:{n}: empty text for id {sid!r} ({lang})")
    return str(sid), lang, text.strip()


def _jsonl(path: Path, langs: list[str]) -> Corpus:
    if not path.is_file():
        raise UserError(f"run.corpus: no such file {path}")
    rows: dict[str, dict[str, str]] = {}
    order: list[str] = []
    # "\n" only: str.splitlines would also split inside a sentence at U+2028, which JSON leaves raw.
    for n, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        sid, lang, text = _jsonl_row(path, n, line)
        if sid not in rows:
            order.append(sid)
        if lang in rows.setdefault(sid, {}):
            raise UserError(f"{path}:{n}: duplicate id {sid!r} for language {lang}")
        rows[sid][lang] = text
    for lang in langs:
        missing = [sid for sid in order if lang not in rows[sid]]
        if len(missing) == len(order):
            raise UserError(f"{path} has no sentences in {LANGUAGES[lang].name} ({lang})")
        if missing:
            raise UserError(
                f"misaligned corpus {path}: {len(missing)} id(s) have no {lang} text (first: {missing[0]!r}); "
                "every id needs a sentence in every selected language"
            )
    return Corpus(f"jsonl:{path.resolve()}", order, {lang: [rows[sid][lang] for sid in order] for lang in langs})


def _flores(langs: list[str], split: str) -> Corpus:
    if split not in ("dev", "devtest"):
        raise UserError(f"run.corpus: flores split must be dev or devtest (got {split!r})")
    try:
        from datasets import load_dataset

        tables = {lang: load_dataset("openlanguagedata/flores_plus", LANGUAGES[lang].flores, split=split)
                  for lang in langs}
    except Exception as exc:  # datasets raises many types when offline; all mean the same here
        raise HubUnreachable(
            f"cannot load FLORES+ from the Hugging Face hub ({type(exc).__name__}); it is gated and needs the "
            "network. Offline, use --corpus ntrex:DIR (e.g. ../shared/data/ntrex128) or --corpus embedded"
        ) from None
    ids = [str(i) for i in tables[langs[0]]["id"]]
    return Corpus(f"flores:{split}", ids, {lang: list(t["text"]) for lang, t in tables.items()})


HELDOUT_FRACTION = 0.1


def is_heldout(sentence_id: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """Stable split by id hash: the same sentence is held out in every language and every run.

    Held-out sentences measure SAE quality and fidelity (never trained on) and alignment gains."""
    digest = hashlib.sha256(sentence_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction
