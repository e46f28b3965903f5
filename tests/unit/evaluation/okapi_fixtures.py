"""Okapi-format benchmark files written on the fly, and the lm-eval tasks built from them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from toolkit.evaluation import tasks


def _mc(lang: str, ident: str, k: int, options: int = 4) -> dict:
    split = ident.split("/")[1]  # in the text, so that a test sees which split few-shot examples come from
    row = {"id": ident, "instruction": f"[{lang}] {split} question {k} [title] about things?",
           "answer": "ABCDE"[k % options]}
    for letter in "abcd"[:options]:
        row[f"option_{letter}"] = f"{lang} option {letter} of {k}"
    if options == 3:
        row["option_d"] = ""
    return row


def _hellaswag(lang: str, k: int) -> dict:
    return {"ind": 1000 + k, "activity_label": f"{lang} activity {k}", "ctx_a": f"{lang} someone does {k}.",
            "ctx_b": "then they", "ctx": f"{lang} someone does {k}. then they", "split": "val",
            "split_type": "indomain", "label": str(k % 4), "endings": [f"{lang} ending {j} [step]" for j in range(4)],
            "source_id": f"activitynet~{k}"}


def write_fixture(root: Path, langs=("en", "hi"), n: int = 14, hellaswag=("en", "hi")) -> Path:
    """Okapi-format files: ARC (hi lacks one item, has a 3-option item), MMLU, HellaSwag; zh has nothing."""
    for folder, splits in (("arc_challenge", ("test", "validation")), ("mmlu", ("val", "dev"))):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for lang in langs:
            for split in splits:
                rows = [_mc(lang, f"{folder}/{split}/{k}", k, 3 if k == 2 else 4) for k in range(n)
                        if not (lang == "hi" and k == 5)]
                (root / folder / f"{lang}_{split}.json").write_text(json.dumps(rows, ensure_ascii=False))
    (root / "hellaswag").mkdir(exist_ok=True)
    for lang in hellaswag:
        rows = [_hellaswag(lang, k) for k in range(n)]
        (root / "hellaswag" / f"{lang}_val.json").write_text(json.dumps(rows, ensure_ascii=False))
    return root


def write_gaps_csv(path: Path, layers: int = 6) -> Path:
    """A tidy gaps.csv as `report` writes it: mass and l0, en/hi/ml/es/ru, the gap in the early layers."""
    cols = ["language", "layer", "statistic", "value", "ci_low", "ci_high", "gap_pct", "gap_parallel_pct",
            "p_value", "n"]
    early = {"en": 0, "hi": -30, "ml": -25, "es": -2, "ru": -8}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for stat, scale in (("mass", 1), ("l0", 10)):
            for lang, g in early.items():
                for layer in range(layers):  # early layers carry the gap, deeper ones a tenth of it
                    v = g if layer < layers // 3 else g / 10
                    w.writerow([lang, layer, stat, 1, 0, 2, "nan" if (lang, layer) == ("ru", 5) else v * scale,
                                0, 0.5, 100])
    return path


def load(tmp_path, data, benches, langs, limit=0, shots=0, seed=0):
    bench_tasks = tasks.plan(benches, langs, str(data))
    return tasks.load(bench_tasks, str(data), tmp_path / "tasks", shots=shots, limit=limit, seed=seed)


def docs_of(bt: tasks.BenchTask) -> list[dict]:
    (name, task), = bt.loaded["tasks"].items()
    return [task.eval_docs[i] for i in bt.samples[name]], task

