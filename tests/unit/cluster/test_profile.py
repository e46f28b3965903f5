"""Cluster profiles: the shipped ones, lookup by name or path, field checks, and the sbatch text they give."""

from __future__ import annotations

import pytest

from tests.unit.cluster.common import TINY
from toolkit.cluster.profile import PROFILE_ENV, available_profiles, load_profile, slurm_parameters
from toolkit.errors import UserError
from toolkit.submit import main


def test_shipped_profiles_load():
    assert {"testcluster", "example-gpu"} <= set(available_profiles())
    tc = load_profile("testcluster")
    assert (tc.partition, tc.cpus_per_task, tc.gpus_per_task) == ("debug", 1, 0)
    assert tc.mem_gb <= 4 and tc.time_min <= 60 and tc.signal_delay_s < tc.time_min * 60
    gpu = load_profile("example-gpu")
    assert gpu.gpus_per_task >= 1 and gpu.container.image.endswith(".sif") and gpu.container.nv
    assert gpu.setup and gpu.account and gpu.qos and gpu.array_parallelism >= 1
    report = gpu.for_stage("report")
    assert report.gpus_per_task == 0 and report.partition != gpu.partition and report.setup == gpu.setup


def test_unknown_profile_lists_the_available_ones():
    with pytest.raises(UserError) as err:
        load_profile("nosuchcluster")
    assert "nosuchcluster" in str(err.value) and "testcluster" in str(err.value) and "example-gpu" in str(err.value)


def test_unknown_profile_from_the_cli_is_a_user_error(tmp_path, capsys):
    assert main(["extract", *TINY, "--run", str(tmp_path), "--executor", "slurm", "--cluster", "nope"]) == 2
    assert "unknown cluster profile 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("data, field", [
    ({"partiton": "gpu"}, "partiton"),
    ({"cpus_per_task": "many"}, "'cpus_per_task'"),
    ({"gpus_per_task": True}, "'gpus_per_task'"),
    ({"time_min": 0}, "'time_min'"),
    ({"mem_gb": -1}, "'mem_gb'"),
    ({"setup": "module load cuda"}, "'setup'"),
    ({"sbatch": ["--exclusive"]}, "'sbatch'"),
    ({"time_min": 10, "signal_delay_s": 900}, "'signal_delay_s'"),
    ({"container": {"image": "lingogap.img"}}, "container.image"),
    ({"container": {"bindz": ["/scratch"]}}, "container.bindz"),
    ({"container": {"nv": "yes"}}, "container.nv"),
    ({"stages": {"extrakt": {"time_min": 5}}}, "stages.extrakt"),
    ({"stages": {"extract": {"container": "x.sif"}}}, "stages.extract.container"),
    ({"stages": {"report": {"cpus_per_task": 0}}}, "'cpus_per_task'"),
])
def test_bad_profile_fields_are_named(tmp_path, data, field):
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError) as err:
        load_profile(str(path))
    assert field in str(err.value) and str(path) in str(err.value)


def test_profiles_are_found_through_the_environment(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text("partition: long\ntime_min: 600\n")
    monkeypatch.setenv(PROFILE_ENV, str(tmp_path))
    assert load_profile("mine").partition == "long"
    assert "mine" in available_profiles()


def test_sbatch_text_has_array_dependency_and_requeue(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    prof = load_profile("testcluster")
    extract = slurm_parameters(prof, "extract", ["export A=1"], dependency="afterok:41")
    text = _make_sbatch_string(command="python job", folder=tmp_path, map_count=3, **extract)
    for line in ("#SBATCH --partition=debug", "#SBATCH --array=0-2%3", "#SBATCH --dependency=afterok:41",
                 "#SBATCH --kill-on-invalid-dep=yes", "#SBATCH --requeue", "#SBATCH --cpus-per-task=1",
                 f"#SBATCH --time={prof.time_min}", f"#SBATCH --signal=USR2@{prof.signal_delay_s}",
                 "#SBATCH --job-name=lingogap-extract", "export A=1"):
        assert line in text, line
    assert f"#SBATCH --mem={int(prof.mem_gb)}GB" in text
    report = _make_sbatch_string(command="python job", folder=tmp_path,
                                 **slurm_parameters(prof, "report", []))
    assert "--requeue" not in report and "--dependency" not in report and "--array" not in report
    gpu = slurm_parameters(load_profile("example-gpu"), "extract", [])
    assert gpu["gpus_per_task"] == 1 and gpu["account"] and gpu["qos"] and gpu["additional_parameters"]["mail-type"]
    assert "gpus_per_task" not in slurm_parameters(load_profile("example-gpu"), "report", [])
