"""The stage registry: lookup by name, the one job-body signature, and how stages split and merge."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest

from toolkit import commands, stages
from toolkit.config import Config
from toolkit.errors import UserError
from toolkit.stages import Stage, Task


def test_an_unknown_stage_names_the_known_ones():
    with pytest.raises(UserError) as err:
        stages.get("extrakt")
    assert "'extrakt'" in str(err.value)
    for name in ("train-saes", "extract", "report", "align", "evaluate"):
        assert name in str(err.value)


def test_job_stages_are_in_pipeline_order():
    assert stages.job_stages() == ("train-saes", "extract", "report", "align", "evaluate")
    for name in ("pipeline", "status", "cancel"):  # commands, not stages
        with pytest.raises(UserError, match="unknown stage"):
            stages.get(name)
        assert commands.get(name).name == name


def test_a_stage_is_registered_once():
    with pytest.raises(ValueError, match="registered twice"):
        stages.register(Stage("extract", "again", (), body="jobs.extract:run"))


def test_a_command_cannot_run_as_a_job():
    with pytest.raises(UserError, match="unknown stage 'status'"):
        stages.run(Config.build(), "status")


def test_every_stage_is_a_command_and_commands_are_apart():
    assert list(commands.COMMANDS) == [*stages.job_stages(), "pipeline", "status", "cancel"]
    assert commands.get("status").stages is None and commands.get("extract").stages is not None
    with pytest.raises(UserError, match="known commands: train-saes"):
        commands.get("statsu")


@pytest.mark.parametrize("name", stages.job_stages())
def test_every_job_body_imports_and_takes_cfg_and_an_optional_task(name):
    params = list(inspect.signature(stages.get(name).job_body()).parameters.values())
    assert [p.name for p in params[:2]] == ["cfg", "task"], f"{name}: {params}"
    assert params[1].default is None
    assert all(p.default is not inspect.Parameter.empty for p in params[1:])


def test_resumable_stages_and_corpus_readers():
    assert [s.name for s in stages.all_stages() if s.resumable] == ["extract", "align"]
    assert [s.name for s in stages.all_stages() if s.reads_corpus] == ["train-saes", "extract", "align"]


def test_extraction_splits_per_language_and_shard_and_merges_back():
    cfg = Config.build({"run": {"preset": "tiny", "langs": "en,hi"}, "extract": {"shards": 2}})
    extract = stages.get("extract")
    tasks = extract.split(cfg)
    assert [t.label for t in tasks] == ["en 1/2", "en 2/2", "hi 1/2", "hi 2/2"]
    assert tasks[2].units == (("hi", 0, 2),)
    merged = extract.merge(tasks)
    assert merged.label == "en 1/2,en 2/2,hi 1/2,hi 2/2"
    assert merged.units == (("en", 0, 2), ("en", 1, 2), ("hi", 0, 2), ("hi", 1, 2))
    one = Config.build({"run": {"preset": "tiny", "langs": "en,hi"}})
    assert [t.label for t in extract.split(one)] == ["en", "hi"]


def test_alignment_splits_per_target_or_joint_and_merges_into_one_call():
    cfg = Config.build({"run": {"preset": "tiny", "langs": "en,hi,ml"}})
    align = stages.get("align")
    targets = [lang for lang in cfg.lang_codes if lang != "en"]  # the languages' own order
    tasks = align.split(cfg)
    assert [(t.label, t.langs) for t in tasks] == [(t, (t,)) for t in targets]
    assert align.merge(tasks) == Task(",".join(targets), langs=None)  # None: every target, the model loaded once
    cfg.align.joint = True
    assert align.split(cfg) == [Task("joint", langs=tuple(targets))]
    cfg.align.targets = "en"
    with pytest.raises(UserError, match="align.targets"):
        align.split(cfg)


def test_other_stages_are_one_task():
    cfg = Config.build()
    for name in ("train-saes", "report", "evaluate"):
        stage = stages.get(name)
        assert stage.split(cfg) == [Task()] and stage.merge(stage.split(cfg)) == Task()


def test_a_command_checks_only_the_stages_it_runs(tmp_path):
    """A live extraction writer refuses `extract` (and a pipeline that extracts), not `pipeline --stages report`."""
    run = tmp_path / "run"
    (run / "activations").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = run / "activations" / "en.h5.lock"
        lock.write_text(json.dumps({"host": os.uname().nodename, "pid": holder.pid, "command": "lingogap extract"}))
        cfg = Config.build({"run": {"preset": "tiny", "run": str(run), "langs": "en,hi", "stages": "report"}})
        commands.preflight(cfg, commands.get("pipeline"))
        for name in ("extract", "pipeline"):
            with pytest.raises(UserError, match=f"pid {holder.pid}"):
                commands.preflight(cfg.merged({"run": {"stages": "extract,report"}}), commands.get(name))
    finally:
        holder.kill()
        holder.wait()
