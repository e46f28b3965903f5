"""toolkit.saes as extraction uses it: shape and hook checks, the sparse encode, dropped decoders, dir sources."""

import pytest
import torch

from toolkit import sae_set, saes
from toolkit.config import Config
from toolkit.errors import UserError
from toolkit.rundir import RunDir


def test_sae_with_wrong_width_or_hook_is_refused(tiny_lm):
    from sae_lens import StandardSAE, StandardSAEConfig

    wrong_width = StandardSAE(StandardSAEConfig(d_in=32, d_sae=16))
    with pytest.raises(UserError, match="d_in=32 but the model width is 64"):
        saes.check(wrong_width, 3, tiny_lm.d_model, "test")
    cfg = StandardSAEConfig(d_in=64, d_sae=16)
    cfg.metadata.hook_name = "blocks.7.hook_resid_post"
    with pytest.raises(UserError, match="trained on hook 'blocks.7.hook_resid_post', not 'blocks.3"):
        saes.check(StandardSAE(cfg), 3, tiny_lm.d_model, "test")


def _sparse_of(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, cols = codes.nonzero(as_tuple=True)
    return rows, cols, codes[rows, cols]


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk", "hooked"])
def test_sparse_encode_equals_saelens_encode(arch):
    """The fast path (ReLU, JumpReLU) and the fallback (others, or hooks attached) give encode's nonzeros."""
    import sae_lens

    torch.manual_seed(0)
    if arch == "topk":
        sae = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=64, d_sae=512, k=8))
    elif arch == "jumprelu":
        sae = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=64, d_sae=512))
        with torch.no_grad():  # some negative thresholds: ReLU still zeroes negative pre-activations
            sae.threshold.copy_(torch.randn(512) * 0.5)
    else:
        sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=64, d_sae=512))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    if arch == "hooked":  # a hook that changes the codes must not be bypassed
        sae.hook_sae_acts_post.add_hook(lambda acts, hook: acts * 2)
    layer = sae_set.LayerSAE(0, sae.eval(), arch)
    x = torch.randn(300, 64) * 3
    with torch.inference_mode():
        expected, got = _sparse_of(sae.encode(x)), layer.encode_sparse(x)
    assert len(expected[0]) > 300  # not a trivially empty comparison
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    torch.testing.assert_close(got[2], expected[2])
    assert (sae_set.plain_threshold(sae) is None) == (arch in ("topk", "hooked"))
    # dense codes (alignment trains through them): the same values and the same gradient w.r.t. x
    upstream = torch.randn(300, 512)
    grads = []
    for encode in (sae.encode, layer.encode):
        xg = x.clone().requires_grad_(True)
        codes = encode(xg)
        (codes * upstream).sum().backward()
        grads.append((codes.detach(), xg.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    torch.testing.assert_close(grads[1][1], grads[0][1])


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_sparse_decode_equals_sae_lens_decode(arch, tiny_lm):
    """recon_err reconstructs from the sparse codes; it must be sae-lens's decode of the dense codes."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig

    torch.manual_seed(0)
    if arch == "relu":
        sae = StandardSAE(StandardSAEConfig(d_in=tiny_lm.d_model, d_sae=256))
    else:
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=tiny_lm.d_model, d_sae=256))
        with torch.no_grad():
            sae.threshold.uniform_(0.0, 0.5)
            sae.b_dec.normal_()
    layer = sae_set.LayerSAE(0, sae.eval(), arch)
    x = torch.randn(50, tiny_lm.d_model)
    with torch.inference_mode():
        rows, cols, values = layer.encode_sparse(x)
        assert len(values) > 0
        ours = layer.decode_sparse(rows, cols, values, len(x))
        theirs = sae.decode(sae.encode(x))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_sae_dir_source_checks_each_layer(tmp_path, tiny_lm):
    from sae_lens import StandardSAE, StandardSAEConfig

    StandardSAE(StandardSAEConfig(d_in=48, d_sae=16)).save_model(tmp_path / "layer_0")
    cfg = Config.build({"sae": {"source": f"dir:{tmp_path}"}}, preset="tiny")
    with pytest.raises(UserError, match="d_in=48"):
        saes.load(cfg.sae_setup, tiny_lm, [0], None, RunDir(cfg.run_dir))
    with pytest.raises(UserError, match="no SAE for layer 1"):
        saes.load(cfg.sae_setup, tiny_lm, [1], None, RunDir(cfg.run_dir))
