"""toolkit.capture: hooks equal hidden_states on the tiny model, early stop, and batching (length grouping,
padding that changes nothing)."""

import torch

from toolkit.capture import ResidualCapture, iter_batches, plan_batches


def test_hooks_equal_hidden_states_except_the_final_norm(tiny_lm):
    batch = next(iter_batches([("a", "Hello there."), ("b", "नमस्ते दुनिया")], tiny_lm.tokenizer, 512, 64))
    captured = {}
    layers = list(range(tiny_lm.n_layers))
    with torch.inference_mode():
        out = tiny_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        with ResidualCapture(tiny_lm, layers, lambda i, h: captured.__setitem__(i, h.clone())) as cap:
            cap.run(batch)
    for i in layers[:-1]:  # hidden_states[i + 1] is the output of block i ...
        torch.testing.assert_close(captured[i], out.hidden_states[i + 1])
    last = layers[-1]  # ... except the last, which already went through the final norm
    assert not torch.allclose(captured[last], out.hidden_states[last + 1])
    torch.testing.assert_close(tiny_lm.model.model.norm(captured[last]), out.hidden_states[last + 1])


def test_capture_stops_after_the_last_selected_layer(tiny_lm):
    calls = []
    blocks = tiny_lm.model.model.layers
    handle = blocks[5].register_forward_hook(lambda *a: calls.append(5))
    try:
        batch = next(iter_batches([("a", "Hi")], tiny_lm.tokenizer, 64, 16))
        with torch.inference_mode(), ResidualCapture(tiny_lm, [1, 3], lambda i, h: None) as cap:
            cap.run(batch)
    finally:
        handle.remove()
    assert calls == []


def test_length_grouping_keeps_padding_under_1_2(ntrex, tiny_lm):
    from toolkit.corpus import load

    sentences = load(f"ntrex:{ntrex}", ["en", "hi"], 400).sentences("hi")
    batches = list(iter_batches(sentences, tiny_lm.tokenizer, 4096, 128))
    padded, real = sum(b.n_padded for b in batches), sum(b.n_real for b in batches)
    assert padded / real < 1.2
    assert sorted(sid for b in batches for sid in b.sentence_ids) == sorted(s for s, _ in sentences)


def test_plan_batches_is_deterministic_and_bounded():
    lengths = [5, 50, 7, 50, 6, 49, 100]
    plan = plan_batches(lengths, batch_tokens=110)
    assert plan == plan_batches(lengths, batch_tokens=110)
    assert sorted(i for b in plan for i in b) == list(range(7))
    for b in plan:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 110



def test_a_padded_batch_captures_what_each_sentence_alone_does(tiny_lm):
    sentences = [("a", "Hello there, how are you today?"), ("b", "नमस्ते दुनिया"), ("c", "你好，世界。再见了朋友")]
    (batch,) = list(iter_batches(sentences, tiny_lm.tokenizer, 4096, 64))
    assert len(batch.sentence_ids) == 3 and batch.n_padded > batch.n_real
    layers = [0, 7, 25]

    def kept(b) -> dict[int, torch.Tensor]:
        out = {}
        with torch.inference_mode(), ResidualCapture(tiny_lm, layers, lambda i, h: out.__setitem__(i, h[b.keep])) as c:
            c.run(b)
        return out

    together = kept(batch)
    alone = [kept(next(iter_batches([s], tiny_lm.tokenizer, 4096, 64))) for s in sentences]
    order = [sid for sid, _ in sentences]
    for layer in layers:
        rows = torch.cat([alone[order.index(sid)][layer] for sid in batch.sentence_ids])
        torch.testing.assert_close(together[layer], rows, rtol=1e-4, atol=1e-4)
