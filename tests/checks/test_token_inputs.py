"""Token inputs: batch_independent and operator_stable on language models (integer ids and
attention masks only): a tiny GPT-like model, its planted-bug twins, and Hugging Face GPT-2 and
BERT from the conformance zoo."""
import pytest
import torch
from torch import nn

from pytest_modelcheck.checks.behaviour import batch_independent
from pytest_modelcheck.checks.stability import operator_stable
from pytest_modelcheck.core.batch import Batch
from pytest_modelcheck.core.tokens import fuzz_tokens, perturb_rows, token_inputs

V, T, D = 40, 6, 16


class TinyGPT(nn.Module):
    """Token + position embeddings, one causal self-attention block with a padding mask, a head.

    ``bug`` plants a way of mixing samples ('batch_mean': a mean over the batch dimension,
    'batchnorm': a BatchNorm1d over the hidden features, which in train mode normalises by the
    batch) or of dividing by zero ('pad_count': pooling divided by the number of padding
    tokens, zero in a row with none; 'mask_sum': pooling divided by the number of attended
    tokens, which is never zero in real data).
    """

    def __init__(self, bug=None):
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(T, D)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.norm = nn.BatchNorm1d(D) if bug == "batchnorm" else nn.LayerNorm(D)
        self.head = nn.Linear(D, V)
        self.bug = bug

    def forward(self, input_ids, attention_mask=None):
        b, t = input_ids.shape
        h = self.tok(input_ids) + self.pos(torch.arange(t))
        causal = torch.ones(t, t, dtype=torch.bool).triu(1)
        pad = None if attention_mask is None else attention_mask == 0
        h = h + self.attn(h, h, h, attn_mask=causal, key_padding_mask=pad, need_weights=False)[0]
        if self.bug == "batch_mean":
            h = h - h.mean(0)
        if self.bug == "batchnorm":
            h = self.norm(h.reshape(b * t, -1)).reshape(b, t, -1)
        else:
            h = self.norm(h)
        if self.bug in ("pad_count", "mask_sum"):
            m = attention_mask[..., None].float()
            count = (1 - m).sum(1) if self.bug == "pad_count" else m.sum(1)
            return self.head((h * m).sum(1) / count)
        return self.head(h)


def _tokens(n=4, pad=(0, 2, 0, 1)):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    for r, k in enumerate(pad[:n]):
        if k:
            mask[r, T - k:] = 0
    return Batch(kwargs={"input_ids": ids, "attention_mask": mask})


# --- core/tokens -----------------------------------------------------------------------------
def test_token_inputs_reads_the_vocabulary_from_the_embedding_and_the_mask_layout():
    specs = token_inputs(TinyGPT(), _tokens())
    assert [(s.path, s.kind) for s in specs] == [("input['input_ids']", "ids"),
                                                ("input['attention_mask']", "mask")]
    ids, mask = specs
    assert (ids.low, ids.high, ids.vocab_source) == (0, V, "embedding")  # not max id + 1
    assert (mask.attended, mask.layout) == (1, "right")


def test_token_inputs_falls_back_to_max_id_and_skips_targets():
    class Hash(nn.Module):  # ids used without an embedding lookup
        def forward(self, token_ids, labels):
            return torch.sin(token_ids.float())[..., None].expand(-1, -1, 2)

    b = Batch(kwargs={"token_ids": torch.tensor([[3, 9], [4, 5]]), "labels": torch.tensor([0, 1])})
    specs = token_inputs(Hash(), b)
    assert [(s.path, s.high, s.vocab_source) for s in specs] == [("input['token_ids']", 10,
                                                                  "max id + 1")]


def test_perturbed_and_fuzzed_tokens_stay_legal():
    data = _tokens()
    ids, mask = token_inputs(TinyGPT(), data)
    g = torch.Generator().manual_seed(0)
    x = data.kwargs["input_ids"]
    y = perturb_rows(ids, x, [1, 2], g)
    assert torch.equal(y[[0, 3]], x[[0, 3]]) and bool((y[[1, 2]] != x[[1, 2]]).all())
    assert int(y.min()) >= 0 and int(y.max()) < V
    m = data.kwargs["attention_mask"]
    pm = perturb_rows(mask, m, [0, 1, 2, 3], g)
    assert not torch.equal(pm.sum(1), m.sum(1)) and bool((pm.sum(1) >= 1).all())
    for kind in ("random", "zeros", "constant", "constant_rows", "tiny", "huge", "low_edge",
                 "high_edge"):
        f = fuzz_tokens(mask, m, kind, g)
        counts = f.sum(1)
        assert set(f.unique().tolist()) <= {0, 1} and bool((counts >= 1).all()), kind
        # right padding, as in the example: attended tokens first
        assert torch.equal(f, (torch.arange(T) < counts[:, None]).long()), kind
        t = fuzz_tokens(ids, x, kind, g)
        assert int(t.min()) >= 0 and int(t.max()) < V, kind


# --- batch_independent -----------------------------------------------------------------------
def test_batch_independent_passes_a_healthy_token_model():
    r = batch_independent(model=TinyGPT(), batch=_tokens())
    assert r.passed is True, r.headline
    assert "no change from other samples' tokens" in r.headline
    assert r.metrics["token_inputs"] == ["input['input_ids']", "input['attention_mask']"]


@pytest.mark.parametrize("bug, mode, module", [("batch_mean", "eval", "<root>"),
                                               ("batchnorm", "train", "norm")])
def test_batch_independent_fails_a_token_model_that_mixes_samples(bug, mode, module):
    r = batch_independent(mode=mode, model=TinyGPT(bug), batch=_tokens())
    assert r.passed is False
    assert r.headline.startswith("expected output of sample 0 to depend only on input sample 0,"
                                 " observed a change of ")
    assert f"first mixing in module '{module}'" in r.headline
    assert r.metrics["module"] == module and r.metrics["max_cross_change"] > 0
    assert "tests/checks/test_token_inputs.py:" in r.metrics["source"]


def test_batch_independent_train_mode_passes_the_healthy_token_model():
    # LayerNorm instead of BatchNorm: nothing to mix, in train mode too (dropout seeded alike)
    assert batch_independent(mode="train", model=TinyGPT(), batch=_tokens()).passed is True


# --- operator_stable -------------------------------------------------------------------------
def test_operator_stable_fuzzes_tokens_of_a_healthy_model():
    r = operator_stable(examples=15, model=TinyGPT(), batch=_tokens())
    assert r.passed is True, r.headline
    assert r.metrics["fuzzed_inputs"] == ["input['input_ids']", "input['attention_mask']"]


def test_operator_stable_fails_a_division_by_the_padding_count():
    # the example pads every row; a row with no padding (all attended) divides by zero
    r = operator_stable(examples=15, model=TinyGPT("pad_count"), batch=_tokens(pad=(1, 2, 1, 1)))
    assert r.passed is False
    assert "in output" in r.headline and "mask attending" in r.headline
    assert "produced in forward by div in module '<root>' (TinyGPT)" in r.metrics["origin"]
    assert r.metrics["failing_kind"] in ("random", "constant", "constant_rows", "huge",
                                         "high_edge")  # the kinds with a full row


def test_operator_stable_never_draws_an_all_padding_row():
    # dividing by the number of attended tokens is safe on every mask real data can hold
    r = operator_stable(examples=15, model=TinyGPT("mask_sum"), batch=_tokens())
    assert r.passed is True, r.headline


# --- Hugging Face models (the conformance zoo) -----------------------------------------------
@pytest.mark.parametrize("name", ["hf_gpt2", "hf_bert"])
def test_hugging_face_language_models_pass(name):
    zoo = pytest.importorskip("tests.conformance.zoo")
    try:
        model, batch, _ = zoo.build_case(name)
    except ImportError as exc:
        pytest.skip(str(exc))
    data = Batch(kwargs=batch)
    r = batch_independent(model=model, batch=data)
    assert r.passed is True, r.headline
    assert "input['input_ids']" in r.metrics["token_inputs"]
    assert "input['labels']" not in r.metrics["token_inputs"]
    r = operator_stable(examples=10, model=model, batch=data)
    assert r.passed is True, r.headline
    assert "input['input_ids']" in r.metrics["fuzzed_inputs"]
