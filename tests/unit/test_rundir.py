"""The run manifest: every stage's entry survives stages that write it at the same moment."""

import json
from concurrent.futures import ProcessPoolExecutor

from toolkit.config import Config
from toolkit.rundir import RunDir, _without_secrets


def _write(root: str, stage: str) -> None:
    RunDir(root).write_manifest(Config.build({}, preset="tiny"), stage, corpus_hash=stage)


def test_concurrent_stages_all_land_in_the_manifest(tmp_path):
    stages = [f"extract-{i}" for i in range(8)]
    with ProcessPoolExecutor(4) as pool:
        list(pool.map(_write, [str(tmp_path)] * len(stages), stages))
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert sorted(data["stages"]) == sorted(stages)
    assert {s: data["stages"][s]["corpus_hash"] for s in stages} == {s: s for s in stages}
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))  # nothing left staged


def test_manifest_keeps_token_counts_and_drops_secrets():
    cleaned = _without_secrets({"extract": {"batch_tokens": 1024, "hf_token": "hf_x"}, "password": "p", "sae": {}})
    assert cleaned == {"extract": {"batch_tokens": 1024}, "sae": {}}


def _adapter(folder):
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_config.json").write_text("{}")


def test_the_runs_adapters_are_every_unit_with_a_trained_adapter(tmp_path):
    """One rule for evaluate, report and status: languages, joint and sweep points; nothing half-made."""
    from toolkit.cluster.status import adapters_line

    run = RunDir(tmp_path)
    assert run.adapters() == {} and adapters_line(tmp_path) == "adapters: none"
    for name in ("ml", "joint", "hi", "hi@lr=0.001", "ml@lr=0.001,seed=1"):
        _adapter(run.align(name))
    (run.align("es") / "checkpoints" / "step-000002" / "adapter").mkdir(parents=True)  # a checkpoint's, not trained
    (run.align("es") / "checkpoints" / "step-000002" / "adapter" / "adapter_config.json").write_text("{}")
    (run.align("base-0123abcd") / "activations").mkdir(parents=True)  # the shared base measurement
    (run.root / "align" / ".hi.123.tmp" / "adapter").mkdir(parents=True)  # a writer's staging folder
    (run.root / "align" / ".hi.123.tmp" / "adapter" / "adapter_config.json").write_text("{}")
    (run.align("mr") / "adapter").mkdir(parents=True)  # saving was interrupted: no adapter_config.json
    assert list(run.adapters()) == ["hi", "hi@lr=0.001", "joint", "ml", "ml@lr=0.001,seed=1"]
    assert run.adapters()["joint"] == tmp_path / "align" / "joint" / "adapter"
    assert list(run.adapters(points=False)) == ["hi", "joint", "ml"]
    assert run.align_point("hi", "lr=0.001") == tmp_path / "align" / "hi@lr=0.001"
    assert adapters_line(tmp_path) == (
        f"adapters: hi, joint, ml; sweep points: 2 (python -m analysis.align_sweep {tmp_path})"
    )


def test_the_run_of_a_path_is_found_from_its_folder_its_activations_or_a_file(tmp_path):
    run = RunDir(tmp_path / "run")
    run.activations.mkdir(parents=True)
    (run.activations / "en.h5").write_bytes(b"")
    for given in (run.root, run.activations, run.activations / "en.h5"):
        assert RunDir.holding(given).reports == run.root / "reports", given
    assert run.gain_report("hi") == run.root / "align" / "hi" / "before_after.json"
    assert run.sae_set("ab12") == run.root / "saes" / "ab12" and run.eval_results == run.root / "eval" / "results.json"
    unit = run.align_folder("hi@lr=0.001")
    assert unit.root == run.align_point("hi", "lr=0.001") and unit.adapter == unit.root / "adapter"
    assert unit.metrics == unit.root / "metrics.json" and unit.checkpoints == unit.root / "checkpoints"
    assert unit.after == unit.root / "after"
    assert unit.gain_report == run.gain_report("hi@lr=0.001") and unit.point_record == run.point_record("hi@lr=0.001")
    base = run.base_measurement("0123abcd")  # beside the units, shared by every one measured on that split
    assert base == run.root / "align" / "base-0123abcd" and RunDir(base).measure_cache == base / "measure.json"
