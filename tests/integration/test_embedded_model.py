"""The embedded Gemma 3 270M: loads offline, covers all ten scripts, produces sensible numbers."""

import pytest
import torch

from toolkit import corpus
from toolkit.languages import LANGUAGES
from toolkit.models import EMBEDDED_GGUF_SHA256

pytestmark = pytest.mark.integration


def test_one_forward_pass_per_language(embedded_lm):
    lm = embedded_lm
    assert lm.n_layers == 18 and lm.d_model == 640 and lm.dtype == torch.float32
    sentences = corpus.load("embedded", list(LANGUAGES), max_sentences=1)
    unk = lm.tokenizer.unk_token_id
    for lang in LANGUAGES:
        text = sentences.texts[lang][0]
        enc = lm.tokenizer(text, return_tensors="pt")
        ids = enc["input_ids"][0]
        assert ids[0] == lm.tokenizer.bos_token_id and unk not in ids.tolist(), lang
        with torch.inference_mode():
            out = lm.model(**enc, labels=enc["input_ids"])
        assert torch.isfinite(out.logits).all(), lang
        # a trained model predicts real text far better than chance (ln 262144 = 12.5 nats)
        assert out.loss.item() < 8.0, (lang, out.loss.item())


def test_cache_records_the_pinned_digest(embedded_lm):
    from toolkit.models import embedded_dir

    assert EMBEDDED_GGUF_SHA256 in (embedded_dir() / "DONE").read_text()
