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
