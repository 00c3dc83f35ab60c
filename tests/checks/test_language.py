"""causal, kv_cache_consistent, tied_parameters and padding_invariant on token models: planted
bugs (a look-ahead mask, a bidirectional encoder, a cache path that forgets positions, an untied
head, an inverted padding mask), healthy twins, public Hugging Face models and usage errors."""
import pytest
import torch
from torch import nn

from pytest_modelcheck import UsageError
from pytest_modelcheck.checks.invariance import padding_invariant
from pytest_modelcheck.checks.language import causal, kv_cache_consistent, tied_parameters
from pytest_modelcheck.core.batch import Batch
from pytest_modelcheck.core.state import fingerprints_equal, model_fingerprint

V, T, D = 20, 9, 16  # vocabulary, tokens, width


def _ids(b=3, t=T, seed=0):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


class TinyGPT(nn.Module):
    """Token and position embeddings, one masked self-attention block, a head tied to the token
    embedding. ``diagonal`` is the ``triu`` diagonal of the -inf mask: 1 is causal, 2 lets each
    position see the next one; ``mask=False`` is a bidirectional encoder."""

    def __init__(self, diagonal=1, mask=True, tie=True):
        super().__init__()
        torch.manual_seed(0)
        self.tok_emb = nn.Embedding(V, D)
        self.pos_emb = nn.Embedding(32, D)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.ff = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        if tie:
            self.head.weight = self.tok_emb.weight
        self.diagonal, self.mask = diagonal, mask

    def forward(self, ids, positions=None):
        t = ids.shape[1]
        if positions is None:
            positions = torch.arange(t)
        h = self.tok_emb(ids) + self.pos_emb(positions)
        mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=self.diagonal) \
            if self.mask else None
        a, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)
        h = h + a
        return self.head(h + torch.relu(self.ff(h)))


class KeywordLM(nn.Module):
    """A Hugging Face style model: keyword inputs, a dict output holding ``logits``."""

    def __init__(self, **kw):
        super().__init__()
        self.inner = TinyGPT(**kw)

    def forward(self, input_ids=None, attention_mask=None):
        return {"logits": self.inner(input_ids), "hidden": attention_mask.float().sum()}


class Conv(nn.Module):
    """A float (batch, channels, time) model; ``causal`` pads on the left only."""

    def __init__(self, causal=True):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(2, 4, 3, padding=0)
        self.causal = causal

    def forward(self, x):
        x = nn.functional.pad(x, (2, 0) if self.causal else (1, 1))
        return self.conv(x)


# ----------------------------------------------------------------------------------------------
# causal
# ----------------------------------------------------------------------------------------------
def test_causal_passes_a_masked_gpt():
    result = causal(model=TinyGPT(), batch=_ids())
    assert result.passed, result.headline
    assert result.metrics["boundaries"] == [1, 2, 4, 6, 7, 8]  # 1, T//4, T//2, 3T//4, T-2, T-1


def test_causal_names_a_one_token_look_ahead():
    result = causal(model=TinyGPT(diagonal=2), batch=_ids())
    assert result.passed is False
    assert "expected outputs at positions < s unchanged" in result.headline
    assert "output position 0 changed when only inputs at positions >= 1 were altered" \
        in result.headline
    assert "it sees position 1, 1 ahead" in result.headline
    assert result.metrics["leak_offset"] == 1
    assert result.metrics["module"] == "MultiheadAttention 'attn'"
    assert "first module whose output changed there: MultiheadAttention 'attn'" in result.details
    assert "triu" in result.details


def test_causal_offset_is_the_smallest_one_seen():
    # position t sees t+1 and t+2: the boundary at the last position exposes t = T-2, which sees
    # T-1, one ahead; with the boundaries restricted to 5, position 4 sees 5, one ahead
    result = causal(positions=[5], model=TinyGPT(diagonal=3), batch=_ids())
    assert result.passed is False
    assert "output position 4 changed when only inputs at positions >= 5" in result.headline
    assert result.metrics["leak_offset"] == 1


def test_causal_fails_a_bidirectional_encoder():
    result = causal(model=TinyGPT(mask=False), batch=_ids())
    assert result.passed is False
    assert "output position 0 changed" in result.headline


def test_causal_keyword_model_picks_input_ids_and_keeps_the_mask():
    ids = _ids()
    batch = Batch(kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert causal(model=KeywordLM(), batch=batch).passed
    bad = causal(input_index="input_ids", model=KeywordLM(diagonal=2), batch=batch)
    assert bad.passed is False and "input['input_ids']" in bad.headline


def test_causal_float_input_along_another_dim():
    x = torch.randn(2, 2, 10, generator=torch.Generator().manual_seed(0))
    assert causal(dim=2, model=Conv(), batch=x).passed
    bad = causal(dim=2, model=Conv(causal=False), batch=x)
    assert bad.passed is False and bad.metrics["leak_offset"] == 1
    assert bad.metrics["module"] == "Conv1d 'conv'"


class Centred(nn.Module):
    def forward(self, x):
        return x - x.mean(1, keepdim=True)  # the leak is in this forward, outside any submodule


def test_causal_names_the_users_forward_when_no_submodule_leaks():
    bad = causal(model=Centred(), batch=torch.randn(2, 5, 3))
    assert bad.metrics["module"] == "Centred '<root>'"
    assert "test_language.py:" in bad.details


def test_causal_vocabulary_from_the_embedding_not_the_batch():
    # ids below 3 only: the alterations still use the whole vocabulary of tok_emb (20)
    ids = torch.randint(0, 3, (2, T), generator=torch.Generator().manual_seed(1))
    seen = []
    model = TinyGPT()
    model.tok_emb.register_forward_pre_hook(lambda m, a: seen.append(int(a[0].max())))
    assert causal(model=model, batch=ids).passed
    assert max(seen) >= 3


def test_causal_leaves_the_model_untouched():
    model = TinyGPT(diagonal=2).train()
    before = model_fingerprint(model)
    causal(model=model, batch=_ids())
    assert fingerprints_equal(before, model_fingerprint(model)) == []


@pytest.mark.parametrize("kwargs, message", [
    ({"dim": "1"}, "dim='1': expected an int"),
    ({"positions": [0]}, "positions=[0]: expected None or a list of ints >= 1"),
    ({"vocab_size": 1}, "vocab_size=1: expected None"),
    ({"input_index": 1.5}, "input_index=1.5: expected None"),
    ({"atol": -1}, "atol=-1: expected a number >= 0"),
])
def test_causal_usage_errors_at_bind_time(kwargs, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        causal.spec.bind((), kwargs)


def test_causal_usage_errors_against_the_batch():
    with pytest.raises(UsageError, match="boundaries must be in 1..8"):
        causal(positions=[9], model=TinyGPT(), batch=_ids())
    with pytest.raises(UsageError, match="the output has shape"):
        causal(model=nn.Sequential(nn.Embedding(V, 4), nn.Flatten()), batch=_ids())


# ----------------------------------------------------------------------------------------------
# kv_cache_consistent
# ----------------------------------------------------------------------------------------------
def _good_step(model, tokens, cache):
    seen = tokens if cache is None else torch.cat([cache, tokens], 1)
    return model(seen)[:, -tokens.shape[1]:], seen


def _forgets_positions(model, tokens, cache):
    """Keeps the tokens but runs the new ones alone: position 0 and no context."""
    seen = tokens if cache is None else torch.cat([cache, tokens], 1)
    return model(tokens), seen


def test_kv_cache_step_fn_passes_when_it_reproduces_the_forward():
    result = kv_cache_consistent(step_fn=_good_step, model=TinyGPT(), batch=_ids())
    assert result.passed, result.headline
    assert result.metrics["prefix"] == T - 4 and result.metrics["steps"] == 4


def test_kv_cache_step_fn_that_forgets_positions_fails_at_the_first_step():
    result = kv_cache_consistent(step_fn=_forgets_positions, model=TinyGPT(), batch=_ids())
    assert result.passed is False
    assert "observed position 5 (decode step 1 of 4) off by max |diff|" in result.headline
    assert result.metrics["position"] == T - 4


def test_kv_cache_without_a_cache_is_skipped_with_the_reason():
    result = kv_cache_consistent(model=TinyGPT(), batch=_ids())
    assert result.passed is None
    assert "no step_fn was given" in result.headline and "TinyGPT" in result.headline


def test_kv_cache_drops_labels_from_a_hugging_face_batch():
    pytest.importorskip("transformers")
    from tests.conformance.zoo import build_case

    model, batch, _ = build_case("hf_gpt2")  # input_ids, attention_mask and labels
    result = kv_cache_consistent(steps=2, model=model, batch=Batch(kwargs=batch))
    assert result.passed, result.headline
    assert result.metrics["prefix"] == 10


def test_kv_cache_usage_errors():
    with pytest.raises(UsageError, match="steps=0: expected an int >= 1"):
        kv_cache_consistent.spec.bind((), {"steps": 0})
    with pytest.raises(UsageError, match="step_fn='x': expected None"):
        kv_cache_consistent.spec.bind((), {"step_fn": "x"})
    with pytest.raises(UsageError, match="prefix \\+ steps must be at most that"):
        kv_cache_consistent(prefix=6, steps=4, step_fn=_good_step, model=TinyGPT(), batch=_ids())


# ----------------------------------------------------------------------------------------------
# tied_parameters
# ----------------------------------------------------------------------------------------------
TIED = [("tok_emb.weight", "head.weight")]


class ReloadUnties(TinyGPT):
    """Re-creates the head in load_state_dict: loads the values, loses the tie."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        self.head = nn.Linear(D, V, bias=False)
        return super().load_state_dict(state_dict, strict, assign)


class ToClones(TinyGPT):
    """Clones the head on .to(): equal values, two tensors."""

    def to(self, *args, **kwargs):
        moved = super().to(*args, **kwargs)
        moved.head.weight = nn.Parameter(moved.head.weight.detach().clone())
        return moved


def test_tied_passes_a_tied_model_and_leaves_it_untouched():
    model = TinyGPT()
    before = model_fingerprint(model)
    result = tied_parameters(TIED, model=model, batch=_ids())
    assert result.passed, result.headline
    assert fingerprints_equal(before, model_fingerprint(model)) == []


def test_tied_fails_an_untied_copy_as_built():
    result = tied_parameters(TIED, model=TinyGPT(tie=False), batch=_ids())
    assert result.passed is False
    assert "observed 'tok_emb.weight' and 'head.weight' are separate tensors" in result.headline
    assert result.headline.endswith("as built")


def test_tied_fails_a_head_recreated_in_load_state_dict():
    result = tied_parameters(TIED, model=ReloadUnties(), batch=_ids())
    assert result.passed is False
    assert "(equal values) after a state_dict save and load into a fresh instance" \
        in result.headline


def test_tied_fails_a_head_cloned_on_to():
    result = tied_parameters(TIED, model=ToClones(), batch=_ids())
    assert result.passed is False and "after .to()" in result.headline


def test_tied_factory_builds_the_fresh_instance():
    assert tied_parameters(TIED, factory=TinyGPT, model=TinyGPT(), batch=_ids()).passed
    bad = tied_parameters(TIED, factory=lambda: TinyGPT(tie=False), model=TinyGPT(), batch=_ids())
    assert bad.passed is False and "fresh instance" in bad.headline


def test_tied_usage_errors():
    with pytest.raises(UsageError, match="tied='x': expected a list of tuples"):
        tied_parameters.spec.bind(("x",))
    with pytest.raises(UsageError, match="is not a tuple of two or more distinct parameter names"):
        tied_parameters.spec.bind(([("a",)],))
    with pytest.raises(UsageError, match="'head.wieght' is not a parameter of TinyGPT.*close:"
                                         " head.weight"):
        tied_parameters([("tok_emb.weight", "head.wieght")], model=TinyGPT(), batch=_ids())
    # a single pair is accepted as one group
    assert tied_parameters.spec.bind((("a", "b"),))["tied"] == (("a", "b"),)


# ----------------------------------------------------------------------------------------------
# padding_invariant on token models
# ----------------------------------------------------------------------------------------------
class TokenEncoder(nn.Module):
    """Embeds ids, attends with the padding mask (1 = real token), mean-pools the real tokens.
    ``inverted`` reads the mask the wrong way round: it attends to padding, ignores real tokens."""

    def __init__(self, inverted=False):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.inverted = inverted

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        ignore = attention_mask.bool() if self.inverted else ~attention_mask.bool()
        a, _ = self.attn(h, h, h, key_padding_mask=ignore, need_weights=False)
        return a


def _padded_tokens(padded=True):
    ids = _ids(4)
    mask = torch.ones_like(ids)
    if padded:
        mask[1::2, -3:] = 0  # odd samples end with 3 padding tokens
    return ids, mask


@pytest.mark.parametrize("form, padded", [("positional", True), ("keyword", True),
                                          ("keyword", False)])
def test_padding_invariant_catches_an_inverted_mask(form, padded):
    ids, mask = _padded_tokens(padded)
    if form == "positional":
        batch, where = ((ids, mask), None), {"mask": 1, "input_index": 0}
    else:
        batch = Batch(kwargs={"input_ids": ids, "attention_mask": mask})
        where = {"mask": "attention_mask", "input_index": "input_ids"}
    healthy = padding_invariant(**where, model=TokenEncoder(), batch=batch)
    assert healthy.passed, healthy.headline
    bad = padding_invariant(**where, model=TokenEncoder(inverted=True), batch=batch)
    assert bad.passed is False
    assert "expected outputs unchanged when 3 elements masked by" in bad.headline


# ----------------------------------------------------------------------------------------------
# public Hugging Face models (tiny configs, random weights)
# ----------------------------------------------------------------------------------------------
def _hf(name):
    pytest.importorskip("transformers")
    from tests.conformance.zoo import build_case

    model, batch, _ = build_case(name)
    return model, Batch(kwargs={k: v for k, v in batch.items() if k != "labels"})


@pytest.mark.parametrize("name", ["hf_gpt2", "hf_llama"])
def test_public_causal_lms_pass_causal_and_kv_cache(name):
    model, batch = _hf(name)
    result = causal(model=model, batch=batch)
    assert result.passed, result.headline
    result = kv_cache_consistent(model=model, batch=batch)
    assert result.passed, result.headline


def test_hugging_face_dict_batches_with_labels_work_as_given():
    pytest.importorskip("transformers")
    from tests.conformance.zoo import build_case

    model, batch, _ = build_case("hf_llama")  # a dict: input_ids, attention_mask, labels
    assert causal(model=model, batch=batch).passed
    assert kv_cache_consistent(steps=2, model=model, batch=batch).passed


def test_gpt2_ties_wte_and_lm_head():
    model, batch = _hf("hf_gpt2")
    result = tied_parameters([("transformer.wte.weight", "lm_head.weight")], model=model,
                             batch=batch)
    assert result.passed, result.headline


def test_llama_untied_head_fails_a_declared_tie():
    model, batch = _hf("hf_llama")  # LlamaConfig ties no word embeddings by default
    result = tied_parameters([("model.embed_tokens.weight", "lm_head.weight")], model=model,
                             batch=batch)
    assert result.passed is False and result.headline.endswith("as built")


class ForgetsCachePositions(nn.Module):
    """Wraps a Hugging Face LM; on cached calls it passes position_ids counted from 0 instead
    of from the cache length (a hand-written decoding loop's classic slip)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask=None, cache=None, use_cache=None):
        positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                       use_cache=use_cache, position_ids=positions)


def test_hf_cache_path_that_forgets_positions_fails():
    model, batch = _hf("hf_gpt2")
    result = kv_cache_consistent(model=ForgetsCachePositions(model), batch=batch)
    assert result.passed is False, result.headline
    assert "use_cache=True and cache=" in result.headline
    assert "decode step 1 of 4" in result.headline


class DropsACacheStep(nn.Module):
    """Wraps a Hugging Face LM; on cached calls it drops the newest key/value from the cache."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask=None, cache=None, use_cache=None):
        if cache is not None and cache.get_seq_length() > 1:
            cache.crop(-1)  # the previous token's key/value is lost
            attention_mask = None
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                       use_cache=use_cache)


def test_hf_cache_path_that_drops_a_step_fails():
    model, batch = _hf("hf_llama")
    result = kv_cache_consistent(model=DropsACacheStep(model), batch=batch)
    assert result.passed is False, result.headline
    assert "observed position 8 (decode step 1 of 4) off by max |diff|" in result.headline


def test_encoder_decoder_without_step_fn_is_skipped():
    model, batch = _hf("hf_t5")
    result = kv_cache_consistent(model=model, batch=batch)
    assert result.passed is None and "decoder_input_ids" in result.headline


def test_bert_padding_invariant_passes():
    model, batch = _hf("hf_bert")
    result = padding_invariant(mask="attention_mask", input_index="input_ids", model=model,
                               batch=batch)
    assert result.passed, result.headline
