"""One instrument per run: every stage after extraction uses the SAE set the extraction recorded."""

import shutil

import pytest
from rich.console import Console

from jobs import align, extract, report
from toolkit import saes
from toolkit.config import Config
from toolkit.errors import UserError
from toolkit.rundir import RunDir
from toolkit.stages import Task
from toolkit.store import ActivationFile, activation_files


def tiny_cfg(run, langs="en,hi,zh", **sae) -> Config:
    values = {"run": {"run": str(run), "langs": langs, "max_sentences": 12, "layers": "0-2"},
              "align": {"align_layers": "0-2", "lora_layers": "0-2", "steps": 2}, "sae": sae}
    return Config.build(values, preset="tiny")


def sae_sets(run) -> list[str]:
    return sorted(p.name for p in (run / "saes").iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    run = tmp_path_factory.mktemp("one_instrument")
    extract.run(tiny_cfg(run))
    return run


def test_extraction_records_its_set_relative_to_the_run(extracted):
    (key,) = sae_sets(extracted)
    recorded = saes.recorded_source(RunDir(extracted))
    assert recorded.source == f"local:{key}" and len(recorded.ids) == 3
    for (path,) in activation_files(extracted).values():
        with ActivationFile(path) as f:
            assert f.attrs["sae_source"] == f"local:{key}"


def test_align_on_fewer_languages_reuses_the_extraction_set(extracted):
    before = sae_sets(extracted)
    align.run(tiny_cfg(extracted, langs="en,hi"), Task("hi", langs=("hi",)))
    assert sae_sets(extracted) == before  # without the record, en+hi would have keyed a second set


def test_report_trains_nothing(extracted):
    before = sae_sets(extracted)
    report.run(tiny_cfg(extracted))
    assert (extracted / "reports" / "gaps.json").is_file() and sae_sets(extracted) == before


def test_loaded_set_is_the_recorded_one_with_its_means(extracted, tiny_lm):
    cfg = tiny_cfg(extracted, langs="en,hi")
    loaded = saes.load(cfg.sae_setup, tiny_lm, [0, 1, 2], _corpus(cfg), RunDir(cfg.run_dir), Console(quiet=True))
    assert loaded.source == saes.recorded_source(RunDir(extracted)).source
    assert all(s.mean is not None and s.mean.shape == (tiny_lm.d_model,) for s in loaded.layers.values())


def test_a_moved_run_finds_its_sets(extracted, tmp_path, tiny_lm):
    moved = tmp_path / "moved"
    shutil.copytree(extracted, moved)
    cfg = tiny_cfg(moved, langs="en,hi")
    loaded = saes.load(cfg.sae_setup, tiny_lm, [0, 1], _corpus(cfg), RunDir(cfg.run_dir), Console(quiet=True))
    (key,) = sae_sets(moved)
    assert loaded.source == f"local:{key}" and saes.local_root(RunDir(moved), loaded.source) == moved / "saes" / key
    assert loaded.root == moved / "saes" / key and loaded.recipe == (loaded.root / "training.json").read_text()


def test_old_absolute_records_still_resolve(extracted, tmp_path):
    (key,) = sae_sets(extracted)
    assert saes.local_root(RunDir(extracted), f"local:{extracted}/saes/{key}") == extracted / "saes" / key
    moved = tmp_path / "elsewhere"
    (moved / "saes" / key).mkdir(parents=True)
    assert saes.local_root(RunDir(moved), f"local:/gone/run/saes/{key}") == moved / "saes" / key


def test_asking_for_another_recipe_stops_with_the_reason(extracted, tiny_lm):
    cfg = tiny_cfg(extracted, width=64)
    with pytest.raises(UserError, match=r"width=128 \(asked: 64\)"):
        saes.load(cfg.sae_setup, tiny_lm, [0], _corpus(cfg), RunDir(cfg.run_dir), Console(quiet=True))


def test_missing_layers_train_in_the_same_set_only_on_the_same_corpus(extracted, tiny_lm):
    narrower = tiny_cfg(extracted, langs="en,hi")
    with pytest.raises(UserError, match=r"no SAE for layer\(s\) \[5\].*another corpus"):
        saes.load(narrower.sae_setup, tiny_lm, [0, 5], _corpus(narrower), RunDir(narrower.run_dir), Console(quiet=True))
    same = tiny_cfg(extracted)
    (key,) = sae_sets(extracted)
    loaded = saes.load(same.sae_setup, tiny_lm, [0, 5], _corpus(same), RunDir(same.run_dir), Console(quiet=True))
    assert sae_sets(extracted) == [key] and (extracted / "saes" / key / "layer_5" / "cfg.json").is_file()
    assert loaded.source == f"local:{key}"


def _corpus(cfg: Config):
    from toolkit import corpus

    return corpus.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)
