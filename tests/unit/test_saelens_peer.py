"""The sae-lens peer of the extraction benchmark runs offline on the tiny model and caches real activations."""

import datasets
import pytest
import torch

from benchmarks.saelens_peer import saelens_cache_tps
from toolkit.models import decoder_layers, tiny_dir


def test_saelens_peer_caches_the_hooked_block_output(tiny_lm, tmp_path):
    texts = [f"Sentence {i}: the river runs past the old mill and the children watch it." for i in range(20)]
    layer = 3
    result = saelens_cache_tps(tiny_dir(), texts, layer=layer, n_layers=tiny_lm.n_layers, context_size=32,
                               work_dir=tmp_path / "peer")
    assert result["tokens"] > 0 and result["seconds"] > 0
    assert result["one_layer_tps"] == result["tokens"] / result["seconds"]
    assert result["all_layers_tps"] == result["one_layer_tps"] / tiny_lm.n_layers
    assert result["hook"] == f"model.layers.{layer}"

    cached = datasets.load_from_disk(result["activations_dir"]).with_format("torch")
    assert len(cached) * 32 == result["tokens"]
    acts, ids = cached[:4][result["hook"]], cached[:4]["token_ids"].long()
    assert acts.shape == (4, 32, tiny_lm.d_model)
    # The cached rows are the residual stream after block `layer` for the stored token ids.
    seen = []

    def keep(module, inputs, output):
        seen.append(output[0] if isinstance(output, tuple) else output)

    handle = decoder_layers(tiny_lm.model)[layer].register_forward_hook(keep)
    try:
        with torch.no_grad():
            tiny_lm.model(input_ids=ids)
    finally:
        handle.remove()
    torch.testing.assert_close(acts, seen[0].float(), atol=1e-4, rtol=1e-4)


def test_saelens_peer_runs_its_model_in_bfloat16(tiny_lm, tmp_path):
    """`dtype` reaches the peer's model; its cache stays float32 (no bfloat16 in its datasets writer)."""
    texts = [f"Sentence {i}: the river runs past the old mill and the children watch it." for i in range(20)]
    f32, bf16 = (saelens_cache_tps(tiny_dir(), texts, layer=2, n_layers=tiny_lm.n_layers, context_size=32,
                                   work_dir=tmp_path / dtype, dtype=dtype) for dtype in ("float32", "bfloat16"))
    rows = []
    for r in (f32, bf16):  # the runner shuffles its rows: pair them by their token ids
        cached = datasets.load_from_disk(r["activations_dir"]).with_format("torch")
        rows.append({tuple(ids.tolist()): act for ids, act in zip(cached["token_ids"], cached[r["hook"]])})
    assert rows[0].keys() == rows[1].keys()
    a, b = (torch.stack([r[k] for k in sorted(rows[0])]) for r in rows)
    assert a.dtype == b.dtype == torch.float32
    assert not torch.equal(a, b)  # computed at another precision...
    assert (a - b).norm() / a.norm() < 0.02  # ...of the same activations
    assert torch.equal(b, b.bfloat16().float())  # values a bfloat16 model produced


def test_every_layer_is_run_and_summed(tmp_path):
    """`--peer-every-layer`: one run per layer of a 3-layer model; the rates follow from the seconds."""
    from benchmarks.paper_gpu import REDUCED, random_gemma2
    from benchmarks.saelens_peer import saelens_every_layer

    lm = random_gemma2({**REDUCED, "num_hidden_layers": 3}, torch.device("cpu"), torch.float32)
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    texts = [f"Sentence {i}: the river runs past the old mill." for i in range(12)]
    r = saelens_every_layer(tmp_path / "model", texts, n_layers=3, context_size=16, work_dir=tmp_path / "w")
    assert len(r["seconds_per_layer"]) == 3 and min(r["seconds_per_layer"]) > 0
    assert r["all_layers_tps"] == r["tokens"] / sum(r["seconds_per_layer"])
    assert r["one_pass_ceiling"] == sum(r["seconds_per_layer"]) / r["seconds_per_layer"][-1]


def test_saelens_peer_fails_with_one_clear_error(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(RuntimeError, match="^sae-lens peer: tokenising failed offline"):
        saelens_cache_tps(tmp_path / "model", ["a b c"], layer=0, n_layers=1, context_size=8, work_dir=tmp_path / "w")
