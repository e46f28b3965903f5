"""Before/after numbers of an adapter on held-out sentences (the gain report), and the measurement behind them.

`before_after` is the one entry point: given the model, the SAEs, the held-out sentences, a `MeasureSpec` and
`MeasurePaths`, it measures the base model (once per split, shared by every target) and the adapted one, and
writes before_after.json. Every number is defined in `DEFINITIONS`, which the file carries. The headline
(`summary`) is over the target's weighted layers (w_l > 0, where it was weaker than English), and the guards
(`GUARD_*`) say whether a gain may be trusted (docs/alignment.md).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from analysis.bands import default_bands
from analysis.stats import bootstrap_ci, paired_bootstrap
from toolkit.align.checkpoints import read_json
from toolkit.capture import iter_batches
from toolkit.config import AlignConfig, ExtractConfig
from toolkit.corpus import Corpus
from toolkit.files import write_json
from toolkit.languages import REFERENCE
from toolkit.models import LoadedModel
from toolkit.rundir import RunDir
from toolkit.sae_set import SAESet, measure_quality

GUARD_ENGLISH_KL = 0.02  # nats per English token, KL(base || adapted): the adapter leaves English's predictions
GUARD_RETENTION = (95.0, 105.0)  # English retention %, over the weighted layers: English's activation stays
GUARD_FVE_DROP = 0.02  # SAE FVE on the adapted target activations, base minus adapted: the SAEs still fit
GUARD_BPB_SLACK = 0.01  # the target's bits per byte at most the `none` arm's + this: the SAE term costs no LM
OVERSHOOT_PCT = 100.0  # closure beyond parity with English
N_BOOT = 1000
LOGIT_TOKENS = 512  # positions per forward pass where full logits are kept (262k floats each on Gemma)
SUMMARY_KEYS = ("objective", "lambda_align", "lambda_keep", "lr", "lora_targets", "lora_r", "align_layers", "seed",
                "closure_pct", "norm_adjusted_gain_pct", "gain_pct", "english_kl", "english_retention_pct", "fve_drop",
                "target_bpb", "minutes", "guards_ok")

DEFINITIONS = {
    "A": "mean over held-out sentences of the per-sentence mean (over tokens, BOS and padding excluded) of the "
         "summed SAE feature activations at the layer",
    "weighted layers": "the target's layers with alignment weight w_l > 0 (where its gap to English was measured "
                       "negative); headline numbers are w-weighted means over them",
    "gain_pct": "100 * (A_after - A_before) / A_before per layer; gain_pct_mean averages the layers, "
                "gain_pct_pooled is the gain of A summed over layers; the target's headline is the w-weighted mean",
    "closure_pct": "100 * sum_l w_l (A_T,after - A_T,before) / A_en,before / sum_l w_l (A_en,before - A_T,before) "
                   "/ A_en,before: 100 = parity with base English, above 100 overshoot (flagged); "
                   "closure_every_layer_pct is it with w_l = 1 on every measured layer where the target is below "
                   "English (the bands' closure over all of them: the layers align_layers leaves out included)",
    "norm_adjusted_gain_pct": "100 * (exp(dlog A - dlog N) - 1) per layer, N the mean residual norm per token "
                              "(the gain left once the residual stream's scale change is divided out), w-weighted; "
                              "norm_adjusted_closure_pct is the closure of A_after * N_before / N_after",
    "retention_pct": "100 * A_after / A_before per layer; english_retention_pct is English's, w-weighted over the "
                     "target's weighted layers",
    "english_kl": "KL(base || adapted) of the next-token distributions, nats per real English token",
    "bpb": "bits per byte: summed next-token negative log-likelihood / (ln 2 * UTF-8 bytes) of the sentences",
    "ppl": "exp of the mean next-token cross-entropy over the held-out sentences' real tokens",
    "fve_drop": "SAE fraction of variance explained on the target's held-out tokens, base minus adapted, "
                "w-weighted; layers dropping more than GUARD_FVE_DROP are flagged",
    "feature shares": "of the target's token-level mass change, the part on features English uses at the layer "
                      "(nonzero mean code on English held-out text) and on the others, in % of A_before",
    "ci": "percentile bootstrap over held-out sentences (95 %); vs_none: paired bootstrap of this minus the none "
          "arm, sentence by sentence",
    "guards_ok": f"english_kl <= {GUARD_ENGLISH_KL}, {GUARD_RETENTION[0]} <= english_retention_pct <= "
                 f"{GUARD_RETENTION[1]}, fve_drop <= {GUARD_FVE_DROP}, and where a none arm exists target_bpb <= "
                 f"its target_bpb + {GUARD_BPB_SLACK}",
}


@dataclass(frozen=True)
class MeasureSpec:
    """What a before/after measurement needs besides the model, the SAEs and the sentences."""

    layers: list[int]  # measured layers
    weights: dict[str, dict[int, float]]  # per target language: its alignment weight per layer
    extract: ExtractConfig
    align: AlignConfig  # the adapter's training settings, for the summary
    preset: str
    seed: int
    train_minutes: float = math.nan


@dataclass(frozen=True)
class MeasurePaths:
    base: Path  # the base model's measurement, shared by every target of the same split
    after: Path  # the adapter's measurement
    report: Path  # before_after.json
    none: Path | None = None  # the none arm's before_after.json (same seed and held-out ids), when there is one


# ------------------------------------------------------------------------------------------ measurement


def before_after(lm: LoadedModel, saes: SAESet, held: Corpus, adapter: Path, spec: MeasureSpec, paths: MeasurePaths,
                 bar=None) -> dict:
    """Measure the base model and `adapter` on `held` (every language), compare, write `paths.report`.

    `lm.model` is the base model, and is again when this returns. The base measurement is reused when present;
    the adapted one when it was made with this very adapter. `bar` is extraction's progress factory.
    """
    from filelock import FileLock
    from peft import PeftModel

    from toolkit.align.adapter import adapter_sha

    began = time.perf_counter()
    sha = adapter_sha(adapter)
    targets = list(spec.weights)
    quality = [*targets, REFERENCE]
    paths.base.mkdir(parents=True, exist_ok=True)
    with FileLock(str(paths.base) + ".lock"):  # array tasks of one run share the base measurement
        before = measure(lm, saes, held, spec, paths.base, quality, ("", "", bar))
    peft_model = PeftModel.from_pretrained(lm.model, str(adapter)).eval()
    adapted = dataclasses.replace(lm, model=peft_model, model_id=f"{lm.model_id} + adapter {sha}")
    try:
        after = measure(adapted, saes, held, spec, paths.after, quality, (str(adapter), sha, bar))
        if "english_kl" not in after.get(REFERENCE, {}):
            after[REFERENCE]["english_kl"] = english_kl(adapted, held.sentences(REFERENCE), spec.extract.max_length)
            write_json(RunDir(paths.after).measure_cache, {"adapter_sha256": sha, "languages": after})
    finally:
        lm.model = peft_model.unload()
    none = read_json(paths.none) if paths.none and paths.none.is_file() else None
    report = compare(before, after, spec, none)
    minutes = (spec.train_minutes if math.isfinite(spec.train_minutes) else 0.0) + (time.perf_counter() - began) / 60
    report["summary"] = summarise(report, spec, minutes)
    report.update(adapter=str(adapter), adapter_sha256=sha, heldout_sentences=len(held.ids),
                  before_dir=str(paths.base), after_dir=str(paths.after), definitions=DEFINITIONS,
                  none_arm=str(paths.none) if none else None)
    write_json(paths.report, report)
    return report


def measure(lm: LoadedModel, saes: SAESet, held: Corpus, spec: MeasureSpec, folder: Path, quality: list[str],
            adapter: tuple[str, str, object]) -> dict[str, dict]:
    """Extract every language of `held` into `folder/activations` and read back, per language and sentence, A and
    the residual norm per layer, NLL and bytes; for the `quality` languages also the SAEs' FVE and L0 and the
    mean code per feature. `adapter` is (path, sha, progress factory), ("", "", ...) for the base model.
    Cached in `folder/measure.json` per language, for the same adapter only; a language measured without the
    quality figures it now needs (another target's run wrote it) is completed."""
    from toolkit.extraction import Extraction, ExtractionUnit, extract_unit, no_progress

    path, sha, bar = adapter
    cache = RunDir(folder).measure_cache
    cached = read_json(cache) if cache.is_file() else {}
    done = cached.get("languages", {}) if cached.get("adapter_sha256", "") == sha else {}
    # float32 codes: an adapter may push activations past float16's range, and these files are small
    job = Extraction(dataclasses.replace(spec.extract, shards=1, overwrite=bool(sha), code_dtype="float32"),
                     RunDir(folder).activations, spec.preset, path)
    out: dict[str, dict] = {}
    for lang in held.langs:
        rec = done.get(lang)
        if rec is None or (lang in quality and "fve" not in rec):  # another target's run measured less
            summary = extract_unit(job, lm, saes, held, ExtractionUnit(lang), spec.layers, bar or no_progress)
            rec = _statistics(lm, saes, held, spec, summary.path, lang, lang in quality)
        out[lang] = rec
        write_json(cache, {"adapter_sha256": sha, "languages": {**done, **out}})
    return out


def _statistics(lm: LoadedModel, saes: SAESet, held: Corpus, spec: MeasureSpec, path: Path, lang: str,
                quality: bool) -> dict:
    """One language's per-sentence statistics from its activation file and an LM pass (see `measure`)."""
    from toolkit.store import ActivationFile

    with ActivationFile(path) as f:
        row = {sid: k for k, sid in enumerate(f.sentence_ids)}
        order = [row[sid] for sid in held.ids]  # the corpus's order in every language, so sentences pair up
        rec = {"ids": list(held.ids),
               "mass": {str(i): f.stats(i, "mass")[order].tolist() for i in spec.layers},
               "norm": {str(i): f.stats(i, "resid_norm")[order].tolist() for i in spec.layers}}
        if quality:
            rec["features"] = {str(i): _feature_means(f, i, saes.layers[i].d_sae) for i in spec.layers}
    nll, tokens = sentence_nll(lm, held.sentences(lang), spec.extract.max_length)
    rec["nll"], rec["tokens"] = [nll[sid] for sid in held.ids], [tokens[sid] for sid in held.ids]
    rec["bytes"] = [len(text.encode("utf-8")) for _, text in held.sentences(lang)]
    if quality:
        rec["fve"], rec["l0"] = sae_quality(lm, saes, held.sentences(lang), spec)
    return rec


def _feature_means(f, layer: int, d_sae: int) -> list[float]:
    """Mean code of each feature over the file's tokens (zeros counted)."""
    indptr, indices, values = f.codes(layer)
    n = max(len(indptr) - 1, 1)
    return (np.bincount(indices, weights=values, minlength=d_sae) / n).tolist()


def sae_quality(lm: LoadedModel, saes: SAESet, sentences: list[tuple[str, str]], spec: MeasureSpec
                ) -> tuple[dict[str, float], dict[str, float]]:
    """FVE and L0 per measured layer on `sentences`, leaving `saes`' own figures untouched (same x_bar)."""
    copy = SAESet(saes.source, {i: dataclasses.replace(saes.layers[i]) for i in spec.layers}, saes.recipe)
    measure_quality(copy, lm, sentences, spec.extract.batch_tokens, spec.extract.max_length)
    return ({str(i): s.fve for i, s in copy.layers.items()}, {str(i): s.l0 for i, s in copy.layers.items()})


def sentence_nll(lm: LoadedModel, sentences: list[tuple[str, str]], max_length: int
                 ) -> tuple[dict[str, float], dict[str, int]]:
    """Per sentence id: the summed next-token negative log-likelihood (nats) of its real tokens, and how many
    tokens were predicted."""
    nll: dict[str, float] = {}
    count: dict[str, int] = {}
    with torch.inference_mode():
        for batch in iter_batches(sentences, lm.tokenizer, LOGIT_TOKENS, max_length):
            ids, mask = batch.input_ids.to(lm.device), batch.attention_mask.to(lm.device)
            logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            per = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
            for sid, value, n in zip(batch.sentence_ids, per.sum(1).tolist(), (labels != -100).sum(1).tolist(),
                                     strict=True):
                nll[sid], count[sid] = value, n
    return nll, count


def english_kl(peft_lm: LoadedModel, sentences: list[tuple[str, str]], max_length: int) -> dict[str, list]:
    """Per sentence (in `sentences`' order): KL(base || adapted) summed over its real positions, and their count."""
    sums: dict[str, tuple[float, int]] = {}
    model = peft_lm.model
    with torch.inference_mode():
        for batch in iter_batches(sentences, peft_lm.tokenizer, LOGIT_TOKENS, max_length):
            inputs = {"input_ids": batch.input_ids.to(peft_lm.device),
                      "attention_mask": batch.attention_mask.to(peft_lm.device), "use_cache": False}
            real = inputs["attention_mask"].bool()
            log_q = F.log_softmax(model(**inputs).logits.float(), dim=-1)
            with model.disable_adapter():
                log_p = F.log_softmax(model(**inputs).logits.float(), dim=-1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1) * real
            for row, sid in enumerate(batch.sentence_ids):
                sums[sid] = (float(kl[row].sum()), int(real[row].sum()))
    return {"ids": [sid for sid, _ in sentences], "kl": [sums[sid][0] for sid, _ in sentences],
            "tokens": [sums[sid][1] for sid, _ in sentences]}


# ------------------------------------------------------------------------------------------ the numbers


def compare(before: dict[str, dict], after: dict[str, dict], spec: MeasureSpec, none: dict | None = None) -> dict:
    """The gain report from two measurements (`measure`), optionally against the none arm's report."""
    layers, targets = spec.layers, list(spec.weights)
    languages = {lang: _language(before[lang], after[lang], layers, lang, targets) for lang in before}
    report = {"targets": targets, "layers": layers, "languages": languages,
              "english_retention_pct": languages.get(REFERENCE, {}).get("retention_pct_mean", math.nan),
              "alignment": {}}
    for t in targets:
        report["alignment"][t] = target_report(before, after, t, spec, none)
    return report


def _language(b: dict, a: dict, layers: list[int], lang: str, targets: list[str]) -> dict:
    a0 = {i: float(np.mean(b["mass"][str(i)])) for i in layers}
    a1 = {i: float(np.mean(a["mass"][str(i)])) for i in layers}
    gain = {i: 100.0 * (a1[i] - a0[i]) / a0[i] if a0[i] else math.nan for i in layers}
    retention = {i: 100.0 * a1[i] / a0[i] if a0[i] else math.nan for i in layers}
    return {"role": "target" if lang in targets else "reference" if lang == REFERENCE else "other",
            "A_before": a0, "A_after": a1, "gain_pct": gain, "retention_pct": retention,
            "gain_pct_mean": mean(gain.values()), "retention_pct_mean": mean(retention.values()),
            "gain_pct_median": median(gain.values()), "gain_pct_pooled": pooled_gain(a0, a1, layers),
            "ppl_before": _ppl(b), "ppl_after": _ppl(a), "bpb_before": _bpb(b), "bpb_after": _bpb(a)}


def _ppl(m: dict) -> float:
    tokens = sum(m.get("tokens", [])) or None
    return math.nan if tokens is None else math.exp(sum(m["nll"]) / tokens)


def _bpb(m: dict) -> float:
    return sum(m["nll"]) / (math.log(2) * max(sum(m["bytes"]), 1))


def _matrix(m: dict, key: str, layers: list[int]) -> np.ndarray:
    """(sentences, layers) of a per-sentence statistic."""
    return np.array([m[key][str(i)] for i in layers], dtype=np.float64).T


def target_report(before: dict, after: dict, lang: str, spec: MeasureSpec, none: dict | None) -> dict:
    """Headline, bands, per-layer figures, feature shares and per-sentence series of one target."""
    b, a, en0, en1 = before[lang], after[lang], before[REFERENCE], after[REFERENCE]
    kl = en1.get("english_kl")
    if b["ids"] != a["ids"] or any(x["ids"] != b["ids"] for x in (en0, en1)) or (kl and kl["ids"] != b["ids"]):
        raise RuntimeError("before/after measurements hold different sentences; delete the align measurement folders")
    w_all = spec.weights[lang]
    weighted = [i for i in spec.layers if w_all.get(i, 0) > 0]
    head = _numbers(b, a, en0, en1, weighted, np.array([w_all[i] for i in weighted]))
    below = [i for i in spec.layers if np.mean(en0["mass"][str(i)]) > np.mean(b["mass"][str(i)])]
    bands = {}
    for name, band in default_bands(spec.layers).items():
        gap_layers = [i for i in band if i in below]
        uniform = _numbers(b, a, en0, en1, band, np.ones(len(band)))
        closing = _numbers(b, a, en0, en1, gap_layers, np.ones(len(gap_layers))) if gap_layers else {}
        bands[name] = {"layers": band, "gain_pct": uniform.get("gain_pct"),
                       "norm_adjusted_gain_pct": uniform.get("norm_adjusted_gain_pct"),
                       "closure_pct": closing.get("closure_pct"), "closure_layers": gap_layers}
    english = {"bpb_before": _bpb(en0), "bpb_after": _bpb(en1)}
    per_sentence = dict(head.pop("per_sentence"))
    if kl:
        english["kl"] = sum(kl["kl"]) / max(sum(kl["tokens"]), 1)
        per_sentence["english_kl"] = [k / max(n, 1) for k, n in zip(kl["kl"], kl["tokens"], strict=True)]
    per_sentence["target_bpb"] = [n / (math.log(2) * max(y, 1)) for n, y in zip(a["nll"], a["bytes"], strict=True)]
    every = _numbers(b, a, en0, en1, below, np.ones(len(below))).get("closure_pct") if below else None
    out = {"weighted_layers": weighted, **head, "closure_every_layer_pct": every, "english": english, "bands": bands,
           "target_bpb_before": _bpb(b), "target_bpb": _bpb(a),
           "sae_quality": _quality(b, a, weighted, w_all), "feature_shares": _shares(b, a, en0, weighted, w_all),
           "per_sentence": {"ids": b["ids"], **per_sentence}}
    for key, ci_key in (("gain_pct", "gain"), ("closure_pct", "closure"), ("english_retention_pct", "retention")):
        series = per_sentence.get(ci_key)
        if series and all(math.isfinite(v) for v in series):
            _, low, high = bootstrap_ci(np.array(series), N_BOOT, spec.seed)
            out[f"{key}_ci"] = [low, high]
    out["overshoot"] = bool(out.get("closure_pct") is not None and out["closure_pct"] > OVERSHOOT_PCT)
    out["vs_none"] = vs_none(out, (none or {}).get("alignment", {}).get(lang), spec.seed)
    return out


def _numbers(b: dict, a: dict, en0: dict, en1: dict, layers: list[int], w: np.ndarray) -> dict:
    """Gain, closure, norm-adjusted gain and English retention over `layers` weighted by `w`, with the
    per-sentence series whose means they are (what CIs resample)."""
    if not layers or w.sum() <= 0:
        return {"per_sentence": {}}
    m0, m1, n0, n1 = (_matrix(x, k, layers) for x, k in ((b, "mass"), (a, "mass"), (b, "norm"), (a, "norm")))
    e0, e1 = _matrix(en0, "mass", layers), _matrix(en1, "mass", layers)
    a0, en_level = m0.mean(0), e0.mean(0)
    ratio = n0.mean(0) / n1.mean(0)  # the residual stream's scale change, divided out per layer
    gap = (en_level - a0) / en_level
    total_gap = float(w @ gap)
    gain_s = 100 * ((m1 - m0) / a0) @ w / w.sum()
    adjusted_s = 100 * ((m1 * ratio - m0) / a0) @ w / w.sum()
    retention_s = 100 * (e1 / en_level) @ w / w.sum()
    closure_s = 100 * ((m1 - m0) / en_level) @ w / total_gap if total_gap > 0 else None
    adjusted_closure = 100 * float(((m1.mean(0) * ratio - a0) / en_level) @ w) / total_gap if total_gap > 0 else None
    dlog = np.log(m1.mean(0) / a0) - np.log(n1.mean(0) / n0.mean(0))
    return {
        "gain_pct": float(gain_s.mean()), "closure_pct": float(closure_s.mean()) if closure_s is not None else None,
        "norm_adjusted_gain_pct": float(adjusted_s.mean()), "norm_adjusted_closure_pct": adjusted_closure,
        "dlog_A_minus_dlog_norm": float(dlog @ w / w.sum()),
        "resid_norm_change_pct": float(100 * (1 / ratio - 1) @ w / w.sum()),
        "english_retention_pct": float(retention_s.mean()),
        "gap_pct_before": float(100 * total_gap / w.sum()),
        "per_sentence": {"gain": gain_s.tolist(), "norm_adjusted_gain": adjusted_s.tolist(),
                         "retention": retention_s.tolist(),
                         **({"closure": closure_s.tolist()} if closure_s is not None else {})},
    }


def _quality(b: dict, a: dict, weighted: list[int], w: dict[int, float]) -> dict:
    """SAE FVE and L0 on the target's held-out tokens, base vs adapted, per layer and w-weighted."""
    if "fve" not in b or "fve" not in a or not weighted:
        return {}
    drop = {i: b["fve"][str(i)] - a["fve"][str(i)] for i in weighted}
    total = sum(w[i] for i in weighted)
    return {"fve_before": {i: b["fve"][str(i)] for i in weighted}, "fve_after": {i: a["fve"][str(i)] for i in weighted},
            "l0_before": {i: b["l0"][str(i)] for i in weighted}, "l0_after": {i: a["l0"][str(i)] for i in weighted},
            "fve_drop": sum(w[i] * drop[i] for i in weighted) / total,
            "fve_drop_flagged_layers": [i for i in weighted if drop[i] > GUARD_FVE_DROP]}


def _shares(b: dict, a: dict, en0: dict, weighted: list[int], w: dict[int, float]) -> dict:
    """Token-level mass change of the target split by whether English uses the feature, in % of A_before."""
    if "features" not in b or not weighted:
        return {}
    shared, only = [], []
    for i in weighted:
        f0, f1 = np.array(b["features"][str(i)]), np.array(a["features"][str(i)])
        used = np.array(en0["features"][str(i)]) > 0
        base = f0.sum() or math.nan
        shared.append(100 * (f1 - f0)[used].sum() / base)
        only.append(100 * (f1 - f0)[~used].sum() / base)
    weights = np.array([w[i] for i in weighted])
    return {"gain_on_english_features_pct": float(np.array(shared) @ weights / weights.sum()),
            "gain_on_target_only_features_pct": float(np.array(only) @ weights / weights.sum())}


def vs_none(target: dict, none: dict | None, seed: int) -> dict | None:
    """This arm minus the none arm, sentence by sentence (paired bootstrap), where both measured the same ids."""
    if not none or none.get("per_sentence", {}).get("ids") != target["per_sentence"]["ids"]:
        return None
    mine, theirs = target["per_sentence"], none["per_sentence"]
    out = {k: paired_bootstrap(theirs[k], mine[k], N_BOOT, seed) for k in mine if k != "ids" and k in theirs}
    out["none_target_bpb"] = none.get("target_bpb")
    return out


def summarise(report: dict, spec: MeasureSpec, minutes: float) -> dict:
    """The unit's headline (`SUMMARY_KEYS`; a joint unit's is the mean over its targets) and whether the guards
    hold. Values that cannot be measured are None."""
    a = spec.align
    rows = list(report["alignment"].values())

    def avg(get) -> float | None:
        values = [v for v in map(get, rows) if v is not None and math.isfinite(v)]
        return float(np.mean(values)) if values else None

    out = {"objective": a.objective, "lambda_align": a.lambda_align, "lambda_keep": a.lambda_keep, "lr": a.lr,
           "lora_targets": a.lora_targets, "lora_r": a.lora_r, "align_layers": a.align_layers, "seed": spec.seed,
           "closure_pct": avg(lambda r: r.get("closure_pct")),
           "norm_adjusted_gain_pct": avg(lambda r: r.get("norm_adjusted_gain_pct")),
           "gain_pct": avg(lambda r: r.get("gain_pct")),
           "english_kl": avg(lambda r: r["english"].get("kl")),
           "english_retention_pct": avg(lambda r: r.get("english_retention_pct")),
           "fve_drop": avg(lambda r: r["sae_quality"].get("fve_drop")),
           "target_bpb": avg(lambda r: r.get("target_bpb")), "minutes": minutes,
           "norm_adjusted_closure_pct": avg(lambda r: r.get("norm_adjusted_closure_pct"))}
    none_bpb = avg(lambda r: (r.get("vs_none") or {}).get("none_target_bpb"))
    out["guards"] = guards(out, none_bpb)
    out["guards_ok"] = all(out["guards"].values())
    return out


def guards(summary: dict, none_bpb: float | None) -> dict[str, bool]:
    """Each guard: True when it holds (an unmeasurable one fails, except the bpb guard without a none arm)."""
    def within(value, low, high) -> bool:
        return value is not None and low <= value <= high

    out = {"english_kl": within(summary["english_kl"], -math.inf, GUARD_ENGLISH_KL),
           "english_retention": within(summary["english_retention_pct"], *GUARD_RETENTION),
           "fve_drop": within(summary["fve_drop"], -math.inf, GUARD_FVE_DROP)}
    if none_bpb is not None:
        out["target_bpb_vs_none"] = within(summary["target_bpb"], -math.inf, none_bpb + GUARD_BPB_SLACK)
    return out


def _finite(values: Iterable) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def mean(values: Iterable) -> float:
    """Mean of the finite values (NaN when there are none)."""
    finite = _finite(values)
    return float(np.mean(finite)) if finite else math.nan


def median(values: Iterable) -> float:
    finite = _finite(values)
    return float(np.median(finite)) if finite else math.nan


def pooled_gain(before: dict, after: dict, layers: list[int]) -> float:
    """Gain of the layer-summed A: robust to layers whose A_before is near zero."""
    total = sum(before[layer] for layer in layers)
    return 100.0 * (sum(after[layer] for layer in layers) - total) / total if total else math.nan
