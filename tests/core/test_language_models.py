"""Language models first-class: (B, T, V) logits with (B, T) targets, structured outputs and the
model's own loss, Hugging Face style ``model(**batch)`` calls."""
import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pytest_modelcheck import UsageError, check_model
from pytest_modelcheck.checks import grads_finite, model_overfits
from pytest_modelcheck.core.batch import Batch, is_hf_pretrained, keywords_call
from pytest_modelcheck.core.losses import OWN_LOSS, class_dim, cross_entropy, resolve_loss

V, T, B = 17, 12, 4


class TinyGPT(nn.Module):
    """Token + position embedding, one causal self-attention block, a head: (B, T) -> (B, T, V)."""

    def __init__(self, vocab=V, dim=32, length=T, zero_logits=False):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(length, dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, vocab)
        self.zero_logits = zero_logits  # the planted bug: logits * 0, nothing can be learnt

    def forward(self, ids):
        t = ids.shape[1]
        h = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=ids.device), 1)
        a, _ = self.attn(h, h, h, attn_mask=causal, need_weights=False)
        h = self.norm(h + a)
        h = h + self.mlp(h)
        logits = self.head(h)
        return logits * 0.0 if self.zero_logits else logits


def _tokens(n=B, t=T + 1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, t), generator=g)


def _lm_batch():
    """Next-token prediction: inputs ids[:, :-1], targets ids[:, 1:] (the label shift)."""
    ids = _tokens()
    return ids[:, :-1], ids[:, 1:]


# -- 1. the inferred loss on (B, T, V) logits ---------------------------------------------------
def test_cross_entropy_takes_classes_last_for_language_model_logits():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(B, T, V, generator=g), _tokens(t=T)
    expected = F.cross_entropy(logits.reshape(-1, V), target.reshape(-1))
    assert torch.allclose(cross_entropy(logits, target), expected)
    assert class_dim(logits, target) == 2


def test_cross_entropy_keeps_classes_in_dim1_for_segmentation():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(2, 5, 6, 7, generator=g), torch.randint(0, 5, (2, 6, 7), generator=g)
    assert class_dim(logits, target) == 1
    assert torch.equal(cross_entropy(logits, target), F.cross_entropy(logits, target))


def test_minus_100_targets_are_ignored_as_torch_does():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(B, T, V, generator=g), _tokens(t=T)
    target[:, :3] = -100
    kept = F.cross_entropy(logits[:, 3:].reshape(-1, V), target[:, 3:].reshape(-1))
    assert torch.allclose(cross_entropy(logits, target), kept)


def test_inferred_loss_for_lm_logits_is_cross_entropy():
    x, y = _lm_batch()
    b = Batch.from_user((x, y))
    loss = resolve_loss(None, b, output=torch.zeros(B, T, V))
    assert loss.name == "cross_entropy"
    total, _ = loss.compute(torch.zeros(B, T, V), b)
    assert math.isclose(float(total), math.log(V), rel_tol=1e-6)  # uniform logits: ln V


def test_inferred_loss_refuses_a_target_fitting_no_class_layout():
    b = Batch.from_user((torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T - 1, dtype=torch.long)))
    with pytest.raises(UsageError, match=r"cannot infer a loss .*output \(4, 12, 17\) float32,"
                                         r" target \(4, 11\) int64"):
        resolve_loss(None, b, output=torch.zeros(B, T, V))


def test_named_cross_entropy_also_handles_lm_logits():
    x, y = _lm_batch()
    r = grads_finite(model=TinyGPT(), batch=(x, y), loss="cross_entropy")
    assert r.passed is True, r.headline


def test_tiny_gpt_overfits_its_batch_with_token_targets():
    torch.manual_seed(0)
    r = model_overfits(steps=60, lr=3e-3, chance_level=math.log(V), model=TinyGPT(),
                       batch=_lm_batch())
    assert r.passed is True, r.headline
    assert r.metrics["loss_fn"] == "cross_entropy"


def test_tiny_gpt_with_zeroed_logits_fails_to_overfit():
    torch.manual_seed(0)
    r = model_overfits(steps=30, lr=3e-3, chance_level=math.log(V),
                       model=TinyGPT(zero_logits=True), batch=_lm_batch())
    assert r.passed is False
    assert "chance" in r.headline


# -- 2. structured outputs: .logits for the inferred loss, .loss when the model computed one ---
@dataclass
class CausalLMOutput:
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None


class StructuredGPT(nn.Module):
    """``forward(input_ids, attention_mask=None, labels=None) -> CausalLMOutput``; with labels
    it computes its own loss, shifting inside (labels == input_ids), scaled by ``own_scale``."""

    def __init__(self, own_scale=1.0):
        super().__init__()
        self.gpt = TinyGPT(length=T + 1)
        self.own_scale = own_scale

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.gpt(input_ids)
        loss = None
        if labels is not None:
            loss = self.own_scale * F.cross_entropy(logits[:, :-1].reshape(-1, V),
                                                    labels[:, 1:].reshape(-1))
        return CausalLMOutput(loss=loss, logits=logits, hidden=logits.detach() * 2)


def _hf_batch(n=B):
    ids = _tokens(n)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_the_models_own_loss_is_used_when_no_loss_is_given():
    torch.manual_seed(0)
    model = StructuredGPT(own_scale=3.0)
    r = grads_finite(model=model, batch=_hf_batch())
    assert r.passed is True, r.headline
    assert r.metrics["loss_fn"] == OWN_LOSS == "the model's own loss (output.loss)"
    with torch.no_grad():
        own = float(model(**_hf_batch()).loss)
    assert math.isclose(r.metrics["loss"], own, rel_tol=1e-5)


def test_logits_of_a_structured_output_feed_the_inferred_loss():
    # no labels to the model: no .loss; the target (B, T) with the (B, T, V) logits -> cross-entropy
    torch.manual_seed(0)
    ids = _tokens()

    class NoLabels(StructuredGPT):
        def forward(self, input_ids, attention_mask=None):
            return super().forward(input_ids, attention_mask)

    batch = Batch(kwargs={"input_ids": ids[:, :-1]}, target=ids[:, 1:])
    r = model_overfits(steps=60, lr=3e-3, model=NoLabels(), batch=batch)
    assert r.metrics["loss_fn"] == "cross_entropy"
    assert r.passed is True, r.headline


def test_a_user_loss_still_wins_over_the_models_own():
    r = grads_finite(model=StructuredGPT(own_scale=3.0), batch=_hf_batch(),
                     loss=lambda out, y: out.logits.float().pow(2).mean())
    assert r.passed is True and r.metrics["loss_fn"] == "<lambda>"


# -- 3. model(**batch) ---------------------------------------------------------------------------
def test_a_dict_naming_forward_parameters_is_passed_as_keywords():
    b = Batch.from_user(_hf_batch(), model=StructuredGPT())
    assert b.args == () and sorted(b.kwargs) == ["attention_mask", "input_ids", "labels"]
    assert b.target is b.kwargs["labels"] and b.target_path == "input['labels']"
    assert b.batch_size == B


def test_a_forward_taking_the_batch_dict_keeps_it_one_argument():
    class Collated(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, batch):
            return self.lin(batch["x"])

    batch = {"x": torch.randn(4, 3), "targets": torch.randn(4, 2)}
    b = Batch.from_user(batch, model=Collated())
    assert len(b.args) == 1 and b.kwargs == {} and b.target_key == "targets"
    assert check_model(Collated(), batch, checks=["grads_finite"]).passed


class LMForward(nn.Module):
    def forward(self, input_ids, attention_mask=None):
        return input_ids


def test_keyword_detection_rules():
    class KwargsOnly(nn.Module):
        def forward(self, **inputs):
            return inputs["x"]

    class Mixed(nn.Module):
        def forward(self, x, **extra):
            return x

    # a class hierarchy from transformers (faked here: the module names are what counts)
    PreTrainedModel = type("PreTrainedModel", (nn.Module,), {"__module__": "transformers.modeling_utils"})
    HF = type("BertForSomething", (PreTrainedModel,), {"forward": lambda self, **kw: kw})

    class Required(nn.Module):
        def forward(self, batch, scale=None):
            return batch["x"]

    assert keywords_call(KwargsOnly(), {"x": 1}) is True
    assert keywords_call(Mixed(), {"x": 1, "mask": 2}) is True  # 'mask' goes to **extra
    assert keywords_call(Mixed(), {"y": 1, "mask": 2}) is False  # the required x is missing
    assert keywords_call(Required(), {"scale": 1}) is False  # batch= would be missing
    assert keywords_call(LMForward(), {"input_ids": 1, "pixels": 2}) is False  # no such parameter
    assert is_hf_pretrained(HF()) and keywords_call(HF(), {"anything": 1}) is True
    assert keywords_call(None, {"x": 1}) is False  # the model unknown: today's behaviour


def test_an_hf_style_model_runs_the_default_set():
    torch.manual_seed(0)
    report = check_model(StructuredGPT(), _hf_batch(8), chance_level=math.log(V))
    failed = [f"{r.check}: {r.headline}" for r in report.results if r.passed is False]
    assert not failed, failed
    assert report.results[0].metrics["loss_fn"] == OWN_LOSS


def test_a_keywords_batch_resizes_clones_and_moves_with_its_target():
    b = Batch.from_user(_hf_batch(), model=StructuredGPT())
    big = b.resized(6)
    assert {k: tuple(v.shape) for k, v in big.kwargs.items()} == {
        "input_ids": (6, T + 1), "attention_mask": (6, T + 1), "labels": (6, T + 1)}
    assert torch.equal(big.kwargs["input_ids"][4:], b.kwargs["input_ids"][:2])  # tiled in order
    assert big.target is big.kwargs["labels"]
    small = b.resized(2)
    assert small.batch_size == 2 and small.target is small.kwargs["labels"]
    cloned = b.clone()
    assert cloned.target is cloned.kwargs["labels"] and cloned.target is not b.target
    moved = b.to("meta")
    assert moved.target is moved.kwargs["labels"] and moved.target.device.type == "meta"


def test_a_factory_of_keyword_dicts_stays_keywords_when_resized():
    b = Batch.from_user(_hf_batch, model=StructuredGPT())
    assert b.factory is _hf_batch and b.args == ()
    resized = b.resized(3)
    assert resized.args == () and resized.kwargs["input_ids"].shape[0] == 3
    assert resized.target is resized.kwargs["labels"]


def test_an_inputs_dict_with_a_separate_target_is_passed_as_keywords():
    ids = _tokens()
    b = Batch.from_user(({"input_ids": ids[:, :-1]}, ids[:, 1:]), model=LMForward())
    assert b.args == () and list(b.kwargs) == ["input_ids"] and b.target.shape == (B, T)
    assert Batch.from_user(({"input_ids": ids}, ids)).args[0]["input_ids"] is ids  # no model


def test_explicit_keywords_batch_with_target_key():
    d = _hf_batch()
    b = Batch(kwargs=d, target_key="labels")
    assert b.has_target and b.target is d["labels"]
    out = b.call(StructuredGPT())
    assert out.loss is not None
    positional = Batch(args=({"x": torch.ones(2, 3), "y": torch.ones(2)},), target_key="y")
    assert positional.target_path == "input[0]['y']"


@pytest.mark.parametrize("kwargs, message", [
    ({"kwargs": {"input_ids": torch.ones(2)}, "target_key": "labels"},
     r"Batch\(target_key='labels'\): no input named 'labels'; expected one of the keyword \(or"
     r" dict\) inputs \['input_ids'\]"),
    ({"kwargs": [torch.ones(2)]}, r"Batch\(kwargs=list\): expected a dict of keyword model inputs"),
])
def test_explicit_batch_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        Batch(**kwargs)


def test_tiny_hugging_face_models_take_their_batch_as_keywords():
    pytest.importorskip("transformers")
    from tests.conformance.zoo import build_case

    torch.set_num_threads(1)
    model, batch, _ = build_case("hf_gpt2")
    b = Batch.from_user(batch, model=model)
    assert b.args == () and "labels" in b.kwargs and b.target is b.kwargs["labels"]
    r = grads_finite(model=model, batch=batch)
    assert r.passed is True and r.metrics["loss_fn"] == OWN_LOSS


def test_markers_call_a_language_model_with_keywords(pytester):
    # the pytest path: a dict batch fixture, a model whose forward names its keys
    pytester.makeconftest('''
        import pytest
        import torch
        import torch.nn.functional as F

        class LM(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = torch.nn.Embedding(11, 16)
                self.head = torch.nn.Linear(16, 11)

            def forward(self, input_ids, attention_mask=None, labels=None):
                logits = self.head(self.emb(input_ids))
                loss = None if labels is None else F.cross_entropy(
                    logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
                return {"loss": loss, "logits": logits}

        @pytest.fixture
        def model():
            torch.manual_seed(0)
            return LM()

        @pytest.fixture
        def batch():
            ids = (torch.arange(9) + torch.tensor([[0], [3], [5], [7]])) % 11  # learnable bigrams
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    ''')
    pytester.makepyfile('''
        import pytest

        @pytest.mark.grads_finite
        @pytest.mark.data_sane
        @pytest.mark.model_overfits(steps=80, lr=0.05)
        def test_lm(): pass
    ''')
    pytester.runpytest("--modelcheck", "-p", "no:cacheprovider").assert_outcomes(passed=1)
