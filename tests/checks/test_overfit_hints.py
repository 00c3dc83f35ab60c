"""model_overfits says what in the outputs blocks fitting: probabilities fed to cross_entropy,
class channels a ReLU keeps at 0. Each with the bug failing and its healthy twin passing."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pytest_modelcheck.checks.overfit import (
    PROBABILITIES_CAUSE,
    UNCONSTRAINED_HINT,
    model_overfits,
    output_diagnosis,
)


def _batch(n=16, d=8, classes=5):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def _classifier(head=None, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 5), *([head] if head else []))


def _hints(details):
    return details.split("hints:")[1].splitlines()[1:]


# ------------------------------------------------------------- softmax before cross-entropy
def test_softmax_before_cross_entropy_is_named():
    # cross_entropy on probabilities p in [0, 1]: the loss cannot go below ln(1 + 4/e) = 0.91 for
    # 5 classes, from ln 5 = 1.61 at init: 0.56x, never 0.3x
    r = model_overfits(model=_classifier(nn.Softmax(-1)), batch=_batch())
    assert r.passed is False
    assert r.headline.startswith("expected loss <= 0.3 x initial ")
    assert f"; {PROBABILITIES_CAUSE} " in r.headline
    assert PROBABILITIES_CAUSE == ("outputs are already probabilities (rows sum to 1):"
                                   " cross_entropy applies log_softmax itself; return logits")
    hints = _hints(r.details)
    assert hints[0].startswith(f"  - {PROBABILITIES_CAUSE}")
    assert not any(UNCONSTRAINED_HINT in h for h in hints)  # the old hint pointed elsewhere
    assert r.metrics["outputs_are_probabilities"] is True


def test_logits_into_cross_entropy_fit():
    r = model_overfits(model=_classifier(), batch=_batch())
    assert r.passed is True, r.headline


class TokenModel(nn.Module):
    """A tiny language model: (B, T) ids -> (B, T, V) logits (or probabilities: the bug)."""

    def __init__(self, softmax, vocab=32, d=32):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab)
        self.softmax = softmax

    def forward(self, ids):
        h = self.emb(ids)
        logits = self.out(h + torch.relu(self.mix(h)))
        return logits.softmax(-1) if self.softmax else logits


def _tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 32, (4, 12), generator=g), torch.randint(0, 32, (4, 12), generator=g)


def flat_cross_entropy(out, target):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))


@pytest.mark.parametrize("loss", [flat_cross_entropy, None], ids=["explicit_loss", "inferred_loss"])
def test_softmax_before_cross_entropy_in_a_token_model_is_named(loss):
    r = model_overfits(model=TokenModel(softmax=True), batch=_tokens(), loss=loss)
    assert r.passed is False
    assert f"; {PROBABILITIES_CAUSE} " in r.headline
    assert _hints(r.details)[0].startswith(f"  - {PROBABILITIES_CAUSE}")
    twin = model_overfits(model=TokenModel(softmax=False), batch=_tokens(), loss=loss)
    assert twin.passed is True, twin.headline


def test_probabilities_under_a_loss_that_takes_them_are_not_blamed():
    probs = torch.full((4, 3), 1 / 3)
    assert output_diagnosis(probs, probs, loss_name="mse")[0] == ""
    assert output_diagnosis(probs, probs, loss_name="nll")[0].startswith(
        "outputs are probabilities (rows sum to 1): nll expects log-probabilities")


# ---------------------------------------------------------------------- a ReLU on the logits
def test_relu_on_the_logits_is_named():
    # seed 2: the ReLU leaves 3 of the 5 class channels at 0 for every sample after training;
    # the samples of those classes stay at ln 5 and the loss stops at 1.22 (goal 0.50)
    r = model_overfits(model=_classifier(nn.ReLU(), seed=2), batch=_batch())
    assert r.passed is False
    assert "; 3 of 5 output channels are 0 for every sample: a ReLU before the output " in r.headline
    hint = _hints(r.details)[0]
    assert hint.startswith("  - 3 of 5 output channels (0, 2, 3) are 0 for every sample after training")
    assert "are in those channels" in hint
    assert r.metrics["dead_output_channels"] == [0, 2, 3]
    assert not any(UNCONSTRAINED_HINT in h for h in _hints(r.details))


def test_the_same_classifier_without_the_relu_fits():
    r = model_overfits(model=_classifier(seed=2), batch=_batch())
    assert r.passed is True, r.headline


def test_an_output_that_is_zero_everywhere_is_not_blamed_on_a_relu():
    zero = torch.zeros(4, 5)
    assert output_diagnosis(zero, zero) == ("", [], {})


def test_squeezenet_fits_at_a_lower_learning_rate_and_is_told_so():
    """torchvision's SqueezeNet ends in Conv2d -> ReLU -> AdaptiveAvgPool2d: its logits cannot
    go below 0. On the conformance batch, at the default lr 3e-3, 6 of its 10 class channels end
    at 0 for every sample and the loss stops at 0.79 for a goal of 0.72 (0.78 with 300 steps);
    at lr=1e-3 it fits (0.58). A healthy public model: the check's retry at a third of the
    learning rate passes it and says to lower the learning rate."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed (pip install -e '.[conformance]')")
    from tests.conformance.zoo import build_case

    model, batch, declared = build_case("tv_squeezenet1_1")
    r = model_overfits(model=model, batch=batch, chance_level=declared["chance_level"])
    assert r.passed, r.headline
    assert r.metrics["passed_at_lr"] == pytest.approx(1e-3)
    assert "lower the learning rate" in r.headline
