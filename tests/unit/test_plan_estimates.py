"""`--dry-run` shows each stage's own plan with an estimated wall time from the machine's cached calibration."""

import re

import pytest

from toolkit import calibration, submit


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("calibration")


def dry_run(capsys, monkeypatch, cache, tmp_path, *args) -> str:
    monkeypatch.setenv("LINGOGAP_CACHE", str(cache))
    monkeypatch.setenv("COLUMNS", "200")
    assert submit.main([*args, "--dry-run", "--preset", "tiny", "--run", str(tmp_path / "run")]) == 0
    return " ".join(capsys.readouterr().out.split())


def estimate(text: str) -> str:
    found = re.search(r"estimated wall time: ([\d.]+ (?:s|min|h)) on this machine \(median of 3 timed passes", text)
    assert found, text[-2000:]
    return found.group(1)


def test_extract_shows_sentences_tokens_disk_sae_training_and_time(capsys, monkeypatch, cache, tmp_path):
    text = dry_run(capsys, monkeypatch, cache, tmp_path, "extract", "--langs", "en,hi", "--max-sentences", "20")
    assert "plan: extract" in text and "disk" in text and "total" in text
    assert "SAE training (batchtopk, quick budget, mix balanced)" in text and "tokens per layer" in text
    assert re.search(r"extraction: [\d,]+ tokens through 26 layers and SAEs of 128 features", text)
    estimate(text)
    assert calibration.cache_file().is_file()


def test_train_saes_shows_tokens_per_layer_and_time(capsys, monkeypatch, cache, tmp_path):
    monkeypatch.setattr(calibration, "_measure", lambda cfg: pytest.fail("measured again despite the cache"))
    text = dry_run(capsys, monkeypatch, cache, tmp_path, "train-saes", "--langs", "en,hi", "--max-sentences", "20")
    assert "plan: train-saes" in text and "training samples per layer" in text and "extraction:" not in text
    estimate(text)


def test_align_shows_pairs_steps_heldout_ids_and_time_not_the_extraction_table(capsys, monkeypatch, cache, tmp_path):
    text = dry_run(
        capsys, monkeypatch, cache, tmp_path, "align", "--langs", "en,hi", "--max-sentences", "40", "--steps", "30"
    )
    assert "plan: align" in text and "plan: embedded" not in text and "bytes per token" not in text
    assert re.search(r"pairs: \d+ training, \d+ validation sentence pairs with en \(of 40 ids\)", text)
    assert "steps: 30 per adapter x 4 pairs = 120 pairs" in text
    assert re.search(r"held-out ids \(\d+, sha256 [0-9a-f]{12}\): emb-\d{4}", text)
    for phase in ("load", "English reference", "training", "validation", "before/after"):
        assert re.search(rf" {phase}: [\d.]+ (s|min|h), ", text), phase
    estimate(text)


def test_evaluate_shows_items_languages_models_and_time(capsys, monkeypatch, cache, tmp_path, okapi):
    text = dry_run(
        capsys, monkeypatch, cache, tmp_path, "evaluate", "--langs", "hi", "--bench-data", str(okapi), "--limit", "7"
    )
    assert "items: 28 in all = arc, mmlu x 2 languages (7 per task and language) x 1 model(s)" in text
    estimate(text)


def test_without_the_model_on_disk_the_plan_says_the_time_is_unknown(capsys, monkeypatch, tmp_path):
    text = dry_run(
        capsys, monkeypatch, tmp_path / "empty-cache", tmp_path, "align", "--model", "embedded", "--langs", "en,hi"
    )
    assert "plan: align" in text and "estimated wall time: unknown until the model is on disk" in text


RATES = calibration.Rates(
    key="test",
    decoder_tps=1000.0,
    lm_tps=200.0,
    train_tps=100.0,
    encode_s=1e-9,
    sae_sps=1e4,
    measured="",
    head_tps=400.0,
    startup_s=5.0,
    load_s=3.0,
    sae_load_s=0.25,
)


def align_phases(tmp_path, **align) -> tuple[dict, dict]:
    """The tiny preset's align phases for hi (26 layers, SAEs of 128 features) at RATES, and the counts behind them."""
    from toolkit import corpus as corpora
    from toolkit import plan
    from toolkit.align.data import split_ids
    from toolkit.config import Config

    cfg = Config.build(
        {"run": {"langs": "hi", "max_sentences": 40, "run": str(tmp_path)}, "align": {"steps": 30, **align}},
        preset="tiny",
    )
    corpus = corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)
    split = split_ids(corpus.ids, cfg.align.heldout, cfg.align.val_fraction, cfg.run.seed)
    tokenizer = plan._tokenizer(cfg)
    phases = {p.name: p.seconds for p in plan.align_phases(cfg, RATES, tokenizer, corpus, split, ["hi"])}

    def tokens(ids: list[str], lang: str) -> int:
        return plan.count_tokens(cfg, corpus.subset(ids).texts[lang], tokenizer)

    counts = {
        "split": split,
        "english": tokens(split.train, "en") / len(split.train),
        "held": {lang: tokens(split.heldout, lang) for lang in ("en", "hi")},
    }
    return phases, counts


def test_the_align_estimate_counts_the_loads_the_english_reference_and_every_before_after_pass(tmp_path):
    phases, counts = align_phases(tmp_path)
    assert list(phases) == ["load", "English reference", "training", "validation", "before/after"]
    assert phases["load"] == pytest.approx(5.0 + 3.0 + 26 * 0.25)  # libraries, model, one SAE per layer
    per_token = 1 / 1000 + 26 * 128 * 1e-9  # the decoder, then every layer's SAE encode
    split = counts["split"]
    read = min(len(split.train), 30 * 4) + len(split.val)  # English sentences the steps draw, and validation's
    # Gemma 2's soft-capped head (the tiny model's) cannot be summarised: no LM-head product in the reference,
    # whose SAE encodes are those of the aligned layers (auto: 0-21 of 26)
    aligned = 1 / 1000 + 22 * 128 * 1e-9
    assert phases["English reference"] == pytest.approx(read * counts["english"] * aligned)
    held = counts["held"]
    extraction, bpb = sum(held.values()) * per_token, sum(held.values()) / 200
    fidelity = extraction  # of the target and English: every language of this run
    kl = 2 * held["en"] / 200
    assert phases["before/after"] == pytest.approx(2 * (extraction + bpb + fidelity) + kl)  # base, then the adapter
    assert phases["validation"] > 0 and phases["training"] > 30 * 4 * counts["english"] / 100


def test_the_english_kl_costs_the_training_steps_unless_its_base_side_is_summarised(tmp_path, monkeypatch):
    from toolkit import plan

    recomputed, counts = align_phases(tmp_path)
    without, _ = align_phases(tmp_path, lambda_keep=0.0)
    steps = 30 + 2 * 7  # gradient norms at step 1 and each of the 6 checkpoints cost about two steps more each
    per_use = 4 * counts["english"] / 400  # the base logits of each step's English sentences
    assert recomputed["training"] - without["training"] == pytest.approx(steps * per_use)
    monkeypatch.setattr(plan, "linear_head", lambda cfg: True)  # Gemma 3: each sentence summarised once instead
    summarised, _ = align_phases(tmp_path)
    assert summarised["training"] == pytest.approx(without["training"])
    read = min(len(counts["split"].train), 30 * 4) + len(counts["split"].val)
    added = summarised["English reference"] - recomputed["English reference"]
    assert added == pytest.approx(2 * read * counts["english"] / 400)
