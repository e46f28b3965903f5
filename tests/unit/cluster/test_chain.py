"""The chain a command runs: its stages, their tasks, absolute paths, and inputs checked before submitting."""

from __future__ import annotations

import pytest

from tests.unit.cluster.common import TINY, cfg_of
from toolkit.cluster.chain import absolute, plan, stage_list
from toolkit.config import Config
from toolkit.errors import UserError
from toolkit.submit import main


def test_stage_lists(tmp_path):
    slurm = {"executor": "slurm", "cluster": "testcluster"}
    assert stage_list(Config.build({"run": slurm}), "pipeline") == ["extract", "report"]  # --sae auto
    assert stage_list(cfg_of(tmp_path, **slurm), "pipeline") == ["train-saes", "extract", "report"]
    assert stage_list(cfg_of(tmp_path), "pipeline") == ["extract", "report"]  # local: one process trains
    trained = Config.build({"run": {"preset": "tiny", "stages": "extract,report,align", "executor": "debug"},
                            "sae": {"source": "train"}})
    assert stage_list(trained, "pipeline") == ["train-saes", "extract", "report", "align"]
    assert stage_list(trained, "align") == ["train-saes", "align"]
    assert stage_list(trained, "report") == ["report"]
    with pytest.raises(UserError, match="run.stages: unknown stage.s. reprot"):
        stage_list(Config.build({"run": {"stages": "extract,reprot"}}), "pipeline")


def test_tasks_per_language_shard_and_target(tmp_path):
    cfg = Config.build({"run": {"preset": "tiny", "langs": "en,hi,ml"}, "extract": {"shards": 2},
                        "sae": {"source": "random"}})
    langs = cfg.lang_codes
    (extract,) = plan(cfg, "extract")
    assert [t.label for t in extract.tasks] == [f"{lang} {k}/2" for lang in langs for k in (1, 2)]
    assert extract.tasks[3].units == ((langs[1], 1, 2),)
    (align,) = plan(cfg, "align")
    targets = [lang for lang in langs if lang != "en"]
    assert [(t.label, t.langs) for t in align.tasks] == [(t, (t,)) for t in targets]
    cfg.align.joint = True
    assert [(t.label, t.langs) for t in plan(cfg, "align")[0].tasks] == [("joint", tuple(targets))]
    cfg.align.targets = "mr"
    with pytest.raises(UserError, match="align.targets"):
        plan(cfg, "align")


def test_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c").mkdir()
    cfg = absolute(Config.build({"run": {"run": "runs/x", "corpus": "text:c"}}))
    assert cfg.run.run == str(tmp_path / "runs" / "x") and cfg.run.corpus == f"text:{tmp_path / 'c'}"


def test_missing_corpus_is_refused_before_submitting(fake_bin, tmp_path, capsys):
    assert main(["extract", *TINY, "--corpus", f"text:{tmp_path / 'gone'}", "--run", str(tmp_path / "run"),
                 "--executor", "slurm", "--cluster", "testcluster"]) == 2
    assert "is not a folder" in capsys.readouterr().err and not (fake_bin / "count").exists()
