"""Multilingual ARC-Challenge, MMLU and HellaSwag through lm-eval, base vs adapted, tied to the gaps.

`tasks` builds the lm-eval tasks and chooses the items (`benchdata` checks Okapi files first), `lm` is
the registered lm-eval model that scores them (each context computed once; ``--eval-scorer hflm`` uses
lm-eval's HFLM instead), `scoring` runs lm-eval and pairs models, `metrics` holds the per-item
continuous metrics, `bpb` bits per byte on held-out sentences, `correlate` the gap <-> performance
correlations, `outputs` results.json/csv, items.csv, bpb.csv, the figures and the Rich tables. The
statistics (McNemar, paired bootstrap, correlations) live in `analysis.stats`. docs/evaluation.md
describes the metrics and every key of results.json.

Two sources of tasks, one code path after loading:

- hub (``eval.bench_data`` empty): lm-eval's own Okapi tasks ``arc_{lang}``, ``m_mmlu_{lang}`` and
  ``hellaswag_{lang}``, and the English originals ``arc_challenge``, ``mmlu`` (a group of 57 subjects)
  and ``hellaswag``, each with its own splits and prompts (the English ``mmlu`` prompt names the subject,
  the Okapi one does not). Offline this fails at once with `HubUnreachable`.
- Okapi-format JSON (``--bench-data DIR``): one template per benchmark (`TEMPLATES`) is filled per
  language and written as a task YAML to an include folder that lm-eval's `TaskManager` reads
  (``dataset_path: json``). Prompts, choices and targets are those of lm-eval's Okapi tasks; ARC and
  HellaSwag documents go through lm-eval's own Okapi ``process_docs``.

  ========== ============================== ================ ===================================
  benchmark  evaluated split (file)         few-shot split   prompt
  ========== ============================== ================ ===================================
  arc        ``arc_challenge/{l}_test``     ``_validation``  ``Question: {q}\\nAnswer:`` -> option texts
  mmlu       ``mmlu/{l}_val``               ``_dev`` first_n  question, ``A. .. D.``, ``Answer:`` -> letters
  hellaswag  ``hellaswag/{l}_val``          ``_train``, else  ``{activity}: {ctx_a} {Ctx_b}`` -> endings
                                            ``_val``
  ========== ============================== ================ ===================================

  A language without its evaluated file is reported as ``missing``; a missing few-shot file falls
  back to the evaluated split (lm-eval never shows an item as its own example).

Item selection (``eval.limit`` = N > 0): every item of a task gets the rank
``sha256(f"{seed}:{item_id}")`` and the N lowest ranks are evaluated. This is a seeded sample that does
not depend on file order, and since an item keeps its id in every language, the languages share as
many items as the files allow. Every model of a run is scored on exactly these items, so base and
adapted are paired item by item. Item ids are ``id``, else ``ind``, else the row number.

Defaults (`toolkit.config.EvalConfig`): 0 shots, every item (``eval.limit`` 0), lm-eval batch size 8,
seed ``run.seed`` (0) for the item sample, the few-shot sampler and torch.

Statistics: per language, the mean and standard error (sample sd / sqrt(n), lm-eval's ``mean_stderr``)
of acc, acc_norm (for MMLU, whose choices are single letters, they coincide) and of the continuous
metrics p_gold, p_gold_norm, margin and margin_norm (`metrics`); the primary metric is p_gold_norm for
ARC and HellaSwag and p_gold for MMLU. Adapted - base on the same items: exact two-sided McNemar on
per-item correctness, and a paired bootstrap CI and p-value for the continuous metrics. Correlations
across languages (English excluded) between each band's mean ``gap_pct`` from ``RUN/reports/gaps.csv``
and the per-language scores and bits per byte: Pearson and Spearman (average ranks for ties) with
seeded permutation p-values (`correlate`).
"""
