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


def test_weights_are_resident_once_loaded(tmp_path):
    """Memory needed is known after loading: no weight is left to page in as new tokens arrive.

    Without `page_in` the mapped embedding table (671 MB) came in a few rows at a time and RSS after
    loading was 0.8 GB for 1.07 GB of weights. A fresh process, so that no other test has touched them.
    """
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = (
        "from toolkit import models\n"
        "from toolkit.config import ModelConfig\n"
        "lm = models.load(ModelConfig(name='embedded'))\n"
        "tensors = [*lm.model.parameters(), *lm.model.buffers()]  # tied weights once\n"
        "weights = sum(t.numel() * t.element_size() for t in tensors)\n"
        "rss = int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) * 1024\n"
        "print(weights, rss)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    weights, rss = map(int, done.stdout.split()[-2:])
    assert weights > 1e9 and rss >= weights, (weights, rss)
