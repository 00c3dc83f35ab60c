"""attention_maps: weights of every attention layer (SDPA, nn.MultiheadAttention, explicit
softmax), the PNG, the collapse flag on a planted mask bug, the opt-in uniform flag, and no
false alarm on healthy random-init transformers (ViT3D, nn.TransformerEncoder, timm ViT)."""
import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from example_models import vit3d
from pytest_modelcheck import UsageError
from pytest_modelcheck.checks import attention_maps
from pytest_modelcheck.core.attention import sdpa_weights


class OneKeyAttention(vit3d.Attention):
    """Planted bug: the key mask is meant to keep the valid tokens (all of them here), but the
    valid count is summed over the wrong dim (1 instead of the token count), so every query sees
    only token 0 (the CLS token). The model still trains: its output reads the CLS token."""

    def forward(self, x):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        valid = torch.ones(batch, tokens, 1, device=x.device)
        n_valid = valid.sum(dim=-1, keepdim=True)  # bug: should be valid.sum(dim=1)
        keep = torch.arange(tokens, device=x.device) < n_valid  # (B, N, N): only key 0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None])
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


def _vit3d(depth=2, bug_in=None):
    torch.manual_seed(0)
    model = vit3d.build_model(depth=depth)
    if bug_in is not None:
        good = model.blocks[bug_in].attn
        bad = OneKeyAttention(64, good.num_heads)
        bad.load_state_dict(good.state_dict())
        model.blocks[bug_in].attn = bad
    return model


def test_planted_one_token_mask_fails_naming_the_layer():
    r = attention_maps(plot=False, model=_vit3d(bug_in=1), batch=vit3d.make_batch(2))
    assert r.passed is False
    assert ("observed attention layer 'blocks.1.attn' collapsed onto one token: in all 4 heads"
            " the queries put 100% of their attention on token 0 (a non-patch token such"
            " as CLS)") in r.headline
    assert r.metrics["collapsed"] == ["blocks.1.attn"]


def test_healthy_vit3d_passes_and_draws_the_grid(tmp_path):
    path = tmp_path / "attention.png"
    r = attention_maps(plot=str(path), model=_vit3d(), batch=vit3d.make_batch(2))
    assert r.passed is True, r.headline
    assert r.metrics["attention_layers"] == 2 and r.metrics["collapsed"] == []
    assert [m["layer"] for m in r.metrics["layers"]] == ["blocks.0.attn", "blocks.1.attn"]
    assert "over a 4x4x4 patch grid + 1 extra tokens" in r.details
    assert r.metrics["plot"] == str(path) and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_plot_goes_to_a_temporary_png():
    r = attention_maps(model=_vit3d(depth=1), batch=vit3d.make_batch(1))
    assert r.passed is True
    with open(r.metrics["plot"], "rb") as f:
        assert f.read(4) == b"\x89PNG"


def test_uniform_flag_is_opt_in():
    """Random-init attention is near-uniform (entropy ~0.99 of log n): not flagged unless asked."""
    model, batch = _vit3d(), vit3d.make_batch(2)
    r = attention_maps(plot=False, model=model, batch=batch)
    assert r.passed is True and min(e for m in r.metrics["layers"] for e in m["entropy"]) > 0.98
    r = attention_maps(uniform=0.98, plot=False, model=model, batch=batch)
    assert r.passed is False
    assert "observed attention layer 'blocks.0.attn' uniform: every head's entropy" in r.headline


def test_transformer_encoder_and_multihead_attention_pass():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2,
                                enable_nested_tensor=False)
    x = torch.randn(3, 12, 32)
    r = attention_maps(plot=False, model=enc, batch=x)
    assert r.passed is True, r.headline
    assert [m["kind"] for m in r.metrics["layers"]] == ["MultiheadAttention"] * 2
    assert r.metrics["layers"][0]["heads"] == 4

    class Causal(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x):
            mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
            out, _ = self.attn(x, x, x, attn_mask=mask, need_weights=False, is_causal=True)
            return out

    r = attention_maps(plot=False, model=Causal(), batch=x)
    assert r.passed is True, r.headline
    first_query = r.metrics["layers"][0]
    assert first_query["keys"] == 12 and all(e < 1.0 for e in first_query["entropy"])


def test_explicit_softmax_inside_an_attention_module_is_captured():
    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            attn = (q @ k.transpose(-2, -1) / 4).softmax(dim=-1)
            return attn @ v

    r = attention_maps(plot=False, model=nn.Sequential(SelfAttention()), batch=torch.randn(2, 7, 16))
    assert r.passed is True
    assert r.metrics["layers"][0]["layer"] == "0" and r.metrics["layers"][0]["kind"] == "softmax"


def test_sdpa_weights_follow_mask_scale_and_gqa():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    v = torch.randn(2, 2, 5, 8, generator=g)
    mask = torch.randn(5, 5, generator=g)
    w, _ = sdpa_weights(q, k, mask, scale=0.3, enable_gqa=True)
    assert torch.allclose(w @ v.repeat_interleave(2, dim=1),
                          F.scaled_dot_product_attention(q, k, v, mask, scale=0.3, enable_gqa=True),
                          atol=1e-5)


def test_no_attention_skips():
    r = attention_maps(model=nn.Linear(4, 2), batch=torch.zeros(2, 4))
    assert r.passed is None and "no attention ran" in r.headline


def test_model_and_batch_are_unchanged():
    model, (x, y) = _vit3d(depth=1), vit3d.make_batch(1)
    before = [p.detach().clone() for p in model.parameters()]
    x0 = x.clone()
    attention_maps(plot=False, model=model, batch=(x, y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert torch.equal(x, x0) and model.training


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")
def test_timm_vit_passes():
    from tests.conformance.zoo import import_torchvision

    if importlib.util.find_spec("torchvision") is not None:
        import_torchvision()  # before timm imports it (torchvision needs care beside CPU torch)
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    r = attention_maps(plot=False, model=model, batch=(x, torch.tensor([0, 2])))
    assert r.passed is True, r.headline
    assert r.metrics["attention_layers"] == 12
    assert r.metrics["layers"][0]["layer"] == "blocks.0.attn"
    assert "over a 2x2 patch grid + 1 extra tokens" in r.details
    for block in model.blocks:  # timm's explicit softmax path
        block.attn.fused_attn = False
    r = attention_maps(plot=False, model=model, batch=(x, torch.tensor([0, 2])))
    assert r.passed is True, r.headline
    assert [m["kind"] for m in r.metrics["layers"]] == ["softmax"] * 12


@pytest.mark.parametrize("kwargs, fragment", [
    ({"collapse": 1.5}, "collapse=1.5: expected a number in (0, 1] or None"),
    ({"uniform": "yes"}, "uniform='yes': expected a number in (0, 1] or None"),
    ({"plot": 3}, "plot=3: expected True (a PNG in the temporary directory), a file path"),
    ({"input_index": -1}, "input_index=-1: expected an int >= 0"),
])
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(UsageError) as info:
        attention_maps(**kwargs, model=_vit3d(depth=1), batch=vit3d.make_batch(1))
    assert fragment in str(info.value)


def test_bad_marker_arguments_fail_at_setup_in_one_line(healthy_project):
    healthy_project.makepyfile("""
        import pytest
        @pytest.mark.attention_maps(collapse=0)
        def test_a(): raise AssertionError("the test body must not run")
    """)
    result = healthy_project.runpytest("--modelcheck")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*@pytest.mark.attention_maps: collapse=0: expected a number in (0, 1]*"])
    out = result.stdout.str()
    assert "Traceback" not in out and "the test body must not run" not in out


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="transformers is not installed")
def test_hugging_face_sdpa_and_eager_attention_pass():
    from tests.conformance.zoo import build_case

    model, batch, _ = build_case("hf_vit")
    r = attention_maps(plot=False, model=model, batch=batch)
    assert r.passed is True, r.headline
    assert [m["kind"] for m in r.metrics["layers"]] == ["scaled_dot_product_attention"] * 2
    assert "over a 4x4 patch grid + 1 extra tokens" in r.details
    model.set_attn_implementation("eager")  # the explicit softmax path
    r = attention_maps(plot=False, model=model, batch=batch)
    assert r.passed is True, r.headline
    assert [m["kind"] for m in r.metrics["layers"]] == ["softmax"] * 2
    model, batch, _ = build_case("hf_bert")  # padded sequences: an attention mask
    r = attention_maps(plot=False, model=model, batch=batch)
    assert r.passed is True and r.metrics["attention_layers"] == 2, r.headline


def test_calls_too_long_to_record_are_listed(monkeypatch):
    import pytest_modelcheck.core.attention as core

    monkeypatch.setattr(core, "MAX_WEIGHTS", 1000)  # 4 heads x 65 x 65 per sample is more
    r = attention_maps(plot=False, model=_vit3d(), batch=vit3d.make_batch(1))
    assert r.passed is None and "more than 1000 weights per sample" in r.headline
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1,
                                enable_nested_tensor=False)
    r = attention_maps(plot=False, model=enc, batch=torch.randn(1, 40, 8))  # 2 x 40 x 40
    assert r.passed is None and "'layers.0.self_attn'" in r.headline
    r = attention_maps(plot=False, model=enc, batch=torch.randn(1, 20, 8))  # 2 x 20 x 20
    assert r.passed is True and r.metrics["too_long"] == []
