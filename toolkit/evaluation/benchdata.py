"""Okapi-format benchmark files checked before lm-eval reads them, so that bad input names its file and item.

A file is a JSON array of records (or JSON lines). Malformed JSON is refused with the file and line; a
record without a field the prompt needs (an option its answer points at, say) or with an id that an
earlier record of the file already has is refused with the file and the item's id. Empty options are
allowed where lm-eval's Okapi processing drops them (ARC's fourth and fifth options).
"""

from __future__ import annotations

import json
from pathlib import Path

from toolkit.errors import UserError

REQUIRED = {
    "arc": ("instruction", "option_a", "option_b", "option_c", "answer"),
    "mmlu": ("instruction", "option_a", "option_b", "option_c", "option_d", "answer"),
    "hellaswag": ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
}


def read_records(path: str | Path) -> list[dict]:
    """The records of one file; malformed JSON is a UserError naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the benchmark file ({exc})") from None
    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise UserError(f"{path}: line {n}: malformed JSON ({exc.msg})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: line {exc.lineno}: malformed JSON ({exc.msg})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise UserError(f"{path}: expected a JSON array of records (objects), one per item")
    return records


def check_file(path: str | Path, bench: str) -> int:
    """Refuse a file with a record that lacks a needed field or repeats an id; returns the number of records."""
    records = read_records(path)
    seen: set[str] = set()
    for n, record in enumerate(records):
        ident = next((str(record[k]) for k in ("id", "ind") if record.get(k) not in (None, "")), None)
        where = f"{path}: item {ident}" if ident is not None else f"{path}: record {n + 1}"
        if ident is not None:
            if ident in seen:
                raise UserError(f"{where}: duplicate id (item ids must be unique within a file)")
            seen.add(ident)
        missing = [k for k in REQUIRED[bench] if record.get(k) is None]
        if missing:
            raise UserError(f"{where}: no {', '.join(missing)}")
        problem = _answer_problem(record, bench)
        if problem:
            raise UserError(f"{where}: {problem}")
    return len(records)


def _answer_problem(record: dict, bench: str) -> str:
    """Why the answer cannot be scored, or ''."""
    if bench == "hellaswag":
        endings = record["endings"]
        if not isinstance(endings, list) or len(endings) < 2:
            return "endings must be a list of at least two endings"
        label = str(record["label"]).strip()
        return "" if label.isdigit() and int(label) < len(endings) else f"label {record['label']!r} is not an ending"
    answer = str(record["answer"]).strip().upper()
    option = f"option_{answer.lower()}"
    if len(answer) != 1 or record.get(option) in (None, ""):
        return f"answer {record['answer']!r} points at no option ({option} is missing or empty)"
    return ""
