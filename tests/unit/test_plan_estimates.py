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
