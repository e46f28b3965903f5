"""Multilingual ARC-Challenge, MMLU and HellaSwag through lm-eval, base vs adapted, tied to the gaps.

`tasks` builds the lm-eval tasks and chooses the items, `scoring` scores a model on them and pairs
models, `outputs` writes results.json/csv, items.csv, the figure and the Rich tables. The statistics
(McNemar, correlations) live in `analysis.stats`.

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

Statistics: accuracy and length-normalised accuracy (lm-eval's ``acc`` and ``acc_norm``; for MMLU,
whose choices are single letters, they coincide), standard error = sample standard deviation / sqrt(n)
(lm-eval's ``mean_stderr``); adapted - base with an exact two-sided McNemar test on per-item
correctness (a sign test on the discordant items). Correlations across languages (English excluded)
between the mean over layers of ``gap_pct`` from ``RUN/reports/gaps.csv`` and accuracy: Pearson and
Spearman (average ranks for ties) with a seeded permutation p-value.
"""
