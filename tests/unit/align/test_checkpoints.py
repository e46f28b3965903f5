"""Checkpoints are read without running code: RNG states round-trip as plain values, planted pickles are refused."""

import random

import numpy as np
import pytest
import torch

from tests.unit.align.conftest import trainer
from toolkit import align, files
from toolkit.align import checkpoints as ckpt
from toolkit.errors import UserError


class Exploit:
    """A pickle that creates `marker` when unpickled by anything that trusts it (weights_only=False)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _draws() -> tuple:
    return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist(), np.random.randn()


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    np.random.randn()  # a cached Gaussian is part of numpy's state
    ckpt.save_rng(tmp_path, 0)
    expected = _draws()
    ckpt.load_rng(tmp_path, 0)
    assert _draws() == expected
    ckpt.load_rng(tmp_path, 3)  # a rank without its own file takes rank 0's
    assert _draws() == expected


@pytest.mark.parametrize("name", ["rng-0.pt", "optimizer.pt"])
def test_a_planted_pickle_is_refused_with_the_file_and_the_fix(tmp_path, name):
    step = tmp_path / "checkpoints" / "step-000002"
    step.mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"torch": Exploit(marker)}, step / name)
    with pytest.raises(UserError, match=f"{step / name}: refused to load.*delete the checkpoint folder {step}"):
        ckpt.load_tensors(step / name)
    assert not marker.exists()


def test_a_damaged_file_or_state_is_a_user_error(tmp_path):
    step = tmp_path / "checkpoints" / "step-000004"
    step.mkdir(parents=True)
    (step / "rng-0.pt").write_bytes(b"junk")  # too short for any format
    with pytest.raises(UserError, match="rng-0.pt: unreadable"):
        ckpt.load_rng(step, 0)
    (step / "rng-0.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="rng-0.pt: unreadable"):
        ckpt.load_rng(step, 0)
    (step / "state.json").write_text("{")
    with pytest.raises(UserError, match="state.json: unreadable"):
        align.latest_state(tmp_path / "checkpoints")


def test_resume_refuses_a_planted_rng_state_before_running_it(tiny, tmp_path):
    lm = tiny[1]
    result = trainer(tiny, tmp_path / "hi", steps=2, checkpoint_every=2).fit()
    lm.model = result.model.unload()
    step = tmp_path / "hi" / "checkpoints" / "step-000002"
    marker = tmp_path / "pwned"
    torch.save(Exploit(marker), step / "rng-0.pt")
    resumed = trainer(tiny, tmp_path / "hi", steps=3, checkpoint_every=2)
    try:
        with pytest.raises(UserError, match="rng-0.pt: refused to load.*delete the checkpoint folder"):
            resumed.fit()
    finally:
        lm.model = resumed.model.unload()
    assert not marker.exists()


def test_checkpoints_are_committed_whole_and_pruned(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        with ckpt.staged_checkpoint(root / f"step-{step:06d}", align.Dist()) as tmp:
            assert tmp.name.startswith(".") and not (root / f"step-{step:06d}").exists()
            files.write_json(tmp / "state.json", {"step": step, "loss": float("nan")})
    stale = root / ".step-000008.999999999.tmp"  # a killed writer's staging folder
    stale.mkdir()
    ckpt.prune(root)
    assert [p.name for p in align.saved_checkpoints(root)] == ["step-000004", "step-000006"]
    assert align.latest_state(root) == {"step": 6, "loss": None} and not stale.exists()
