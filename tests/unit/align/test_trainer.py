"""Training: the loss falls, adapters round-trip, a killed run resumes exactly, DeepSpeed and two ranks agree."""

import json
import math
import multiprocessing
import os
import signal
import socket
import sys
import time
from pathlib import Path

import deepspeed.comm.comm as ds_comm
import numpy as np
import pytest
import torch

from tests.unit.align.conftest import cfg_for, cli, trainer
from tests.unit.align.test_checkpoints import Exploit
from toolkit import align, models, submit
from toolkit import corpus as corpora
from toolkit import saes as sae_sources
from toolkit.config import ModelConfig, parse_layers
from toolkit.errors import UserError
from toolkit.rundir import RunDir


def test_loss_falls_and_every_term_is_finite(reference):
    cfg, summaries, metrics = reference
    steps = metrics["steps"]
    assert [s["step"] for s in steps] == list(range(1, cfg.align.steps + 1))
    for record in steps + metrics["validation"]:
        assert all(math.isfinite(record[k]) for k in align.TERMS), record
    assert steps[0]["keep"] == pytest.approx(0.0, abs=1e-6)  # LoRA starts as the base model
    assert np.mean([s["total"] for s in steps[-2:]]) < np.mean([s["total"] for s in steps[:2]])
    assert steps[-1]["align"] < steps[0]["align"]
    assert [v["step"] for v in metrics["validation"]] == [2, 4, 6]
    assert metrics["complete"] and metrics["split"]["heldout"] == 8 and metrics["resumed_from"] == []
    assert set(metrics["weights"]["hi"]) == {"0", "5", "10", "15", "20", "25"}
    assert np.mean(list(metrics["weights"]["hi"].values())) == pytest.approx(1.0)
    assert len(set(metrics["rank_digests"])) == 1


def test_the_default_objective_trains_with_every_term_finite(tiny, tmp_path):
    from toolkit.config import AlignConfig

    result = trainer(tiny, tmp_path / "hi", objective=AlignConfig().objective, steps=4).fit()
    tiny[1].model = result.model.unload()  # the fixture's base model, for the tests after this one
    steps = json.loads((tmp_path / "hi" / "metrics.json").read_text())["steps"]
    assert steps[0]["align"] > 0 and steps[0]["keep"] == pytest.approx(0.0, abs=1e-6)
    for record in steps:
        assert all(math.isfinite(record[k]) for k in align.TERMS), record


def test_adapter_round_trips_with_identical_outputs(tiny, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    cfg, lm, saes, corpus, split, layers = tiny
    result = trainer(tiny, tmp_path / "hi", steps=2).fit()
    try:
        batch = align.collate(lm.tokenizer, corpus.sentences("hi")[:3], 48)
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        with torch.no_grad():
            trained = result.model.eval()(**inputs).logits
            saved = load_file(str(result.adapter / "adapter_model.safetensors"))
            assert saved.keys() == result.state.keys()
            assert all(torch.equal(saved[k], v) for k, v in result.state.items())
            assert all(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
            fresh = models.load(cfg.model)
            reloaded = PeftModel.from_pretrained(fresh.model, str(result.adapter)).eval()(**inputs).logits
            merged = models.load(ModelConfig(name="tiny", adapter=str(result.adapter))).model(**inputs).logits
            base = models.load(ModelConfig(name="tiny")).model(**inputs).logits
        assert torch.equal(trained, reloaded)
        torch.testing.assert_close(merged, trained, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(base, trained)
    finally:
        lm.model = result.model.unload()


def _forked(target, *args):
    """A child process that inherits the imported modules: the CLI's startup costs ~8 s of imports."""
    proc = multiprocessing.get_context("fork").Process(target=target, args=args)
    proc.start()
    return proc


def _cli_main(argv: list[str]) -> None:
    sys.exit(submit.main(argv))


def test_resume_after_sigkill_matches_an_uninterrupted_run(reference, tmp_path):
    _, _, ref_metrics = reference
    proc = _forked(_cli_main, cli(tmp_path))
    first = tmp_path / "align" / "hi" / "checkpoints" / "step-000002" / "state.json"
    deadline = time.monotonic() + 120
    while not first.is_file() and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert first.is_file(), f"no checkpoint appeared (exit code {proc.exitcode})"
    assert proc.exitcode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "align" / "hi" / "adapter").exists()
    assert submit.main(cli(tmp_path)) == 0
    metrics = json.loads((tmp_path / "align" / "hi" / "metrics.json").read_text())
    assert metrics["step"] == ref_metrics["step"] == 6 and metrics["resumed_from"]
    assert [s["total"] for s in metrics["steps"]] == [s["total"] for s in ref_metrics["steps"]]
    assert metrics["final"] == ref_metrics["final"]
    assert metrics["validation"] == ref_metrics["validation"]
    assert metrics["adapter_sha256"] == ref_metrics["adapter_sha256"]
    assert (tmp_path / "align" / "hi" / "before_after.json").is_file()


def test_deepspeed_on_cpu_runs_two_steps_without_compiling_ops(tiny, tmp_path):
    cfg, lm, saes, corpus, split, layers = tiny
    saved_env = dict(os.environ)
    result = None
    try:
        started = time.perf_counter()
        dist = align.setup_distributed("deepspeed", "cpu")
        assert ds_comm.cdb.shm_comm_op is None  # the shared-memory op DeepSpeed would JIT-compile for minutes
        deepspeed = trainer(tiny, tmp_path / "hi", dist, "deepspeed", steps=2, grad_accum=2)
        result = deepspeed.fit()
        seconds = time.perf_counter() - started
        print(f"DeepSpeed CPU: init + 2 steps (x2 accumulation) in {seconds:.1f} s")
        assert result.metrics["engine"] == "deepspeed" and len(result.metrics["steps"]) == 2
        assert all(math.isfinite(s["total"]) for s in result.metrics["steps"])
        assert any(v.abs().sum() > 0 for k, v in result.state.items() if "lora_B" in k)
        state = tmp_path / "hi" / "checkpoints" / "step-000002" / "deepspeed" / "state"
        optim = state / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        assert optim.is_file()
        # DeepSpeed's own resume path reads its files with weights_only=True; a planted pickle is refused
        deepspeed.engine.load(state.parents[1])
        marker = tmp_path / "pwned"
        torch.save(Exploit(marker), optim)
        with pytest.raises(UserError, match=f"{optim}.*refused to load.*delete the checkpoint folder"):
            deepspeed.engine.load(state.parents[1])
        assert not marker.exists()
    finally:
        if result is not None:
            lm.model = result.model.unload()
        if torch.distributed.is_initialized():  # leave no process group (or DeepSpeed's cached groups) behind
            ds_comm.destroy_process_group()
        ds_comm.cdb = None
        os.environ.clear()
        os.environ.update(saved_env)


def _rank(rank: int, port: int, out: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    cfg = cfg_for(out, **{"align.engine": "deepspeed", "align.steps": 2, "align.zero_stage": 1})
    dist = align.setup_distributed("deepspeed", "cpu")
    corpus = corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)
    lm = models.load(cfg.model)
    layers = parse_layers(cfg.align.align_layers, lm.n_layers)
    saes = sae_sources.load(cfg.sae_setup, lm, layers, corpus, RunDir(cfg.run_dir))
    split = align.split_ids(corpus.ids, 0.2, 0.1, 0)
    result = trainer((cfg, lm, saes, corpus, split, layers), out / "hi", dist, "deepspeed").fit()
    torch.save(align.trainable_state(result.model), out / f"rank{dist.rank}.pt")


def test_two_process_data_parallel_ranks_agree(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_forked(_rank, rank, port, tmp_path) for rank in range(2)]
    for proc in procs:
        proc.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(v.abs().sum() > 0 for k, v in states[0].items() if "lora_B" in k)
    metrics = json.loads((tmp_path / "hi" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(set(metrics["rank_digests"])) == 1 and len(metrics["rank_digests"]) == 2


def test_the_grid_file_a_point_came_from_is_not_part_of_the_fingerprint(tiny, tmp_path):
    """A sweep point's settings are its align values; naming the grid (or not) must not orphan its checkpoints."""
    plain = trainer(tiny, tmp_path / "a").fingerprint
    assert trainer(tiny, tmp_path / "b", sweep="grid.yaml").fingerprint == plain
    assert trainer(tiny, tmp_path / "c", lambda_align=0.5).fingerprint != plain
