"""Decoder blocks of the common causal-LM families: found, hooked, and extracted end to end.

Each family is a tiny random model built offline from its config, with the tiny preset's byte-level
tokenizer, saved with save_pretrained so it loads the way `--model DIR` does.
"""

import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from toolkit.capture import ResidualCapture, iter_batches
from toolkit.config import ModelConfig
from toolkit.errors import UserError
from toolkit.models import decoder_layers, load, tiny_dir
from toolkit.store import ActivationFile

N_LAYERS = 3
WIDTH = 32
SENTENCES = [("s1", "Hello world."), ("s2", "नमस्ते दुनिया, यह एक परीक्षण है।"), ("s3", "A bit longer sentence here.")]


def _family(name: str):
    import transformers as tf

    tokens = {"vocab_size": 260, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
    llama_like = {"hidden_size": WIDTH, "intermediate_size": 64, "num_hidden_layers": N_LAYERS,
                  "num_attention_heads": 2, "num_key_value_heads": 1, **tokens}
    return {
        "llama": (tf.LlamaConfig(**llama_like), tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config(**llama_like), tf.Qwen2ForCausalLM),
        "gpt2": (tf.GPT2Config(n_embd=WIDTH, n_layer=N_LAYERS, n_head=2, n_positions=256, **tokens),
                 tf.GPT2LMHeadModel),
        "gpt_neox": (tf.GPTNeoXConfig(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=N_LAYERS,
                                      num_attention_heads=2, max_position_embeddings=256, **tokens),
                     tf.GPTNeoXForCausalLM),
    }[name]


def build_family(name: str, target) -> str:
    from transformers import AutoTokenizer

    config, cls = _family(name)
    torch.manual_seed(0)
    cls(config).save_pretrained(str(target))
    AutoTokenizer.from_pretrained(str(tiny_dir())).save_pretrained(str(target))
    return str(target)


FAMILIES = ["llama", "qwen2", "gpt2", "gpt_neox"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_lm(request, tmp_path_factory):
    path = build_family(request.param, tmp_path_factory.mktemp(request.param))
    return load(ModelConfig(name=path, device="cpu", dtype="float32"))


def test_decoder_layers_finds_every_block(family_lm):
    blocks = decoder_layers(family_lm.model)
    assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) == N_LAYERS == family_lm.n_layers


def test_capture_equals_hidden_states(family_lm):
    captured: dict[int, torch.Tensor] = {}
    batch = next(iter_batches(SENTENCES, family_lm.tokenizer, 4096, 64))
    with ResidualCapture(family_lm, list(range(N_LAYERS)), lambda i, t: captured.__setitem__(i, t)) as cap:
        cap.run(batch)
    with torch.no_grad():
        hidden = family_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 output_hidden_states=True).hidden_states
    assert sorted(captured) == list(range(N_LAYERS))
    # The last entry of hidden_states has the final norm applied; the hook sees the raw block output.
    for i in range(N_LAYERS - 1):
        torch.testing.assert_close(captured[i], hidden[i + 1])
    assert captured[N_LAYERS - 1].shape == hidden[-1].shape


def test_peft_wrapped_model_is_unwrapped(family_lm):
    from peft import LoraConfig, get_peft_model

    targets = {"GPT2LMHeadModel": ["c_attn"], "GPTNeoXForCausalLM": ["query_key_value"]}
    peft_model = get_peft_model(family_lm.model, LoraConfig(
        r=2, target_modules=targets.get(type(family_lm.model).__name__, ["q_proj", "v_proj"])))
    try:
        assert decoder_layers(peft_model) is decoder_layers(peft_model.get_base_model())
    finally:
        peft_model.unload()


def test_unknown_layout_names_the_class_and_the_fix():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

        @property
        def base_model(self):  # a self-reference like transformers' base models: must not spin
            return self

    with pytest.raises(UserError, match=r"Odd.*stack \(1\).*--hook-module"):
        decoder_layers(Odd())
    odd = Odd()
    assert decoder_layers(odd, "stack") is odd.stack
    with pytest.raises(UserError, match="--hook-module blocks: Odd has no list of modules there"):
        decoder_layers(Odd(), "blocks")


def test_gpt2_extracts_end_to_end(tmp_path):
    model = build_family("gpt2", tmp_path / "gpt2")
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "toolkit.submit", "extract", "--preset", "tiny", "--run", str(run), "--model", model,
         "--langs", "en,hi", "--sae", "random", "--sae-width", "16", "--max-sentences", "4", "--device", "cpu",
         "--executor", "debug"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for lang in ("en", "hi"):
        with ActivationFile(run / "activations" / f"{lang}.h5") as f:  # refuses an incomplete file
            assert len(f.sentence_ids) == 4


def test_one_gguf_parse_serves_every_read_of_a_file_from_one_reader_and_restores_gguf(tmp_path):
    import gguf
    import numpy as np

    from toolkit.models import _one_gguf_parse

    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(100)])
    writer.add_tensor("w", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    original = gguf.GGUFReader
    with _one_gguf_parse():
        first, again = gguf.GGUFReader(path), gguf.GGUFReader(str(path))
        assert first is again  # parsed once
        assert len(first.fields["tokenizer.ggml.tokens"].data) == 100
        np.testing.assert_array_equal(np.asarray(first.tensors[0].data), np.arange(12).reshape(3, 4))
    assert gguf.GGUFReader is original
    assert gguf.GGUFReader(path) is not first
