"""More planted bugs, each beside a healthy twin that must pass: exploding outputs at
initialization, a fitted buffer left out of the state_dict in a module that takes arguments,
and healthy models that looked like bugs (a converged loss, a padded encoder under autocast,
a small tabular batch with a rare flag)."""
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pytest_modelcheck.checks import (data_sane, dtype_stable, grad_norms_stable, model_overfits,
                                      state_roundtrip)


def _mlp(scale: float) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        for layer in m:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(scale)
    return m


def _classes():
    torch.manual_seed(1)
    return torch.randn(8, 6), torch.randint(0, 10, (8,))


def test_exploding_initialization_fails_against_the_chance_level():
    r = model_overfits(chance_level=math.log(10), model=_mlp(10.0), batch=_classes())
    assert r.passed is False and "initial loss near the chance level" in r.headline


def test_a_normal_initialization_passes_with_the_chance_level():
    r = model_overfits(chance_level=math.log(10), model=_mlp(1.0), batch=_classes())
    assert r.passed is True, r.headline


class FittedScaler(nn.Module):
    """Standardises its input with statistics fitted after construction, kept out of the
    state_dict (persistent=False): a reloaded model loses them."""

    def __init__(self, n_features):
        super().__init__()
        self.register_buffer("mu", torch.zeros(n_features), persistent=False)
        self.net = nn.Linear(n_features, 10)

    def forward(self, x):
        return self.net(x - self.mu)


class SavedScaler(FittedScaler):
    """The healthy twin: the fitted statistics are saved."""

    def __init__(self, n_features):
        super().__init__(n_features)
        self.register_buffer("mu", torch.zeros(n_features), persistent=True)


class Positional(nn.Module):
    """A buffer computed from its arguments in __init__: reproduced by any fresh instance."""

    def __init__(self, length, width):
        super().__init__()
        pos = torch.arange(length).float()[:, None] / (1 + torch.arange(width).float())
        self.register_buffer("table", torch.sin(pos), persistent=False)
        self.net = nn.Linear(width, 4)

    def forward(self, x):
        return self.net(x + self.table)


@pytest.mark.parametrize("cls,lost", [(FittedScaler, True), (SavedScaler, False)])
def test_fitted_buffer_of_a_module_with_arguments(cls, lost):
    torch.manual_seed(0)
    m = cls(6)
    m.mu.copy_(torch.full((6,), 3.0))
    r = state_roundtrip(model=m, batch=torch.randn(8, 6) + 3)
    assert r.passed is not lost, r.headline
    if lost:
        assert "non-persistent buffer 'mu'" in r.headline


def test_buffer_computed_from_arguments_is_not_flagged():
    torch.manual_seed(0)
    r = state_roundtrip(model=Positional(5, 3), batch=torch.randn(2, 5, 3))
    assert r.passed is True, r.headline


def test_converged_loss_is_not_vanishing_gradients():
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(4, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, 3))
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    r = grad_norms_stable(steps=20, lr=1e-2, model=wide, batch=(x, y))
    assert r.passed is True, r.headline


def test_vanishing_gradients_before_convergence_still_fail():
    torch.manual_seed(0)
    saturated = nn.Sequential(nn.Linear(16, 1), nn.Sigmoid())
    with torch.no_grad():
        saturated[0].weight.mul_(1e4)  # the sigmoid saturates: no gradient, loss stays at 0.25
    r = grad_norms_stable(steps=5, model=saturated,
                          batch=(torch.randn(8, 16), torch.full((8, 1), 0.5)))
    assert r.passed is False and "vanishing" in r.headline


class PaddedEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32, padding_idx=0)
        self.enc = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2, enable_nested_tensor=True)
        self.head = nn.Linear(32, 10)

    def forward(self, tokens):
        return self.head(self.enc(self.emb(tokens), src_key_padding_mask=tokens == 0).mean(1))


def test_padded_encoder_under_autocast_passes_dtype_stable():
    torch.manual_seed(0)
    tokens = torch.randint(1, 50, (8, 20))
    tokens[:, 15:] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: nested tensors are a prototype
        r = dtype_stable(model=PaddedEncoder(), batch=tokens)
    assert r.passed is True, r.headline


def test_rare_binary_feature_in_a_small_tabular_batch_is_not_a_dead_channel():
    torch.manual_seed(0)
    x = torch.randn(8, 5)
    x[:, 4] = 0.0  # a flag that is 1 in one sample of a hundred
    assert data_sane(batch=x, model=nn.Linear(5, 1)).passed is True


def test_constant_feature_over_a_large_batch_is_still_flagged():
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    x[:, 4] = 0.0
    r = data_sane(batch=x, model=nn.Linear(5, 1))
    assert r.passed is False and "channel 4" in r.headline


class OneHot(nn.Module):
    def __init__(self, give_classes):
        super().__init__()
        self.give_classes = give_classes
        self.lin = nn.Linear(20, 3)

    def forward(self, tokens):
        if self.give_classes:
            return self.lin(F.one_hot(tokens, 20).float())
        return self.lin(F.one_hot(tokens).float()[..., :20])  # num_classes read from the data


class Packed(nn.Module):
    """An LSTM over a packed batch; ``peek`` also reads the data's maximum with ``.item()``."""

    def __init__(self, peek: bool) -> None:
        super().__init__()
        self.peek = peek
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.head = nn.Linear(16, 1)

    def forward(self, x, lengths):
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

        if self.peek:
            x = x / x.abs().max().item()
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        y, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True,
                                   total_length=x.shape[1])
        return self.head(y).squeeze(-1)


def test_a_packed_sequence_read_of_its_host_side_batch_sizes_is_not_a_host_sync():
    # recurrent layers read PackedSequence.batch_sizes[0] with int(); batch_sizes is a CPU
    # tensor on every device, so that read is no device sync
    from pytest_modelcheck.checks import no_host_sync

    batch = ((torch.randn(4, 10, 8), torch.tensor([10, 7, 3, 5])), torch.randn(4, 10))
    assert no_host_sync(model=Packed(False), batch=batch).passed is True
    r = no_host_sync(model=Packed(True), batch=batch)
    assert r.passed is False and r.metrics["count"] == 1, (r.headline, r.metrics)


def test_one_hot_with_num_classes_is_not_a_host_sync():
    from pytest_modelcheck.checks import no_host_sync

    tokens = torch.arange(20) % 20
    assert no_host_sync(model=OneHot(True), batch=tokens).passed is True
    r = no_host_sync(model=OneHot(False), batch=tokens)
    assert r.passed is False and "_local_scalar_dense" in r.headline + r.details
