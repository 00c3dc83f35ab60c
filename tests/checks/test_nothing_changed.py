"""Every registered check leaves the caller's model, batch and process exactly as they were.

Parametrized over ``all_checks()``, so a check added later is covered from the day it is
registered (and fails here until it has an entry in CONFIGS). Each check runs in a passing and a
failing configuration, on a model that raises halfway through forward, and on one that changes
its input in place; every time, the model (parameter and buffer bytes, ``.grad``,
``requires_grad``, training flags, hooks), the batch tensors and the global state (RNG states,
grad mode, default dtype, warning filters, active torch modes...) must be bitwise identical.
"""
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pytest_modelcheck.checks import all_checks
from pytest_modelcheck.core.state import (
    fingerprints_equal,
    global_state_fingerprint,
    model_fingerprint,
    tensors_identical,
)


def _nan_in_backward(out, target):
    # sqrt at zero: the forward is finite (the extra term is 0), every gradient is NaN
    return F.cross_entropy(out, target) + torch.sqrt((out - out).pow(2).sum())


# check name -> (arguments with which it passes, arguments with which it fails) on Subject()
CONFIGS = {
    "grads_finite": ({}, {"loss": _nan_in_backward}),
    "shapes_consistent": ({"out": ("B", 4)}, {"out": ("B", 5)}),
    "model_overfits": ({"steps": 8, "lr": 0.05, "target_ratio": 0.9}, {"steps": 2, "target": 0.0}),
    # on the fake clock: 8 samples every 0.25 s = 32 samples/s
    "throughput_at_least": ({"rate": "1 samples/s", "warmup": 1, "min_runs": 3},
                            {"rate": "1e12 samples/s", "warmup": 1, "min_runs": 3}),
    "memory_under": ({"limit": "64 GiB"}, {"limit": "1 B"}),
}


class Subject(nn.Module):
    """BatchNorm buffers, dropout, a frozen layer, a head left in eval mode, existing gradients.

    ``raise_on_call=k`` raises on the k-th forward of each copy, after the encoder ran;
    ``mutate_input`` scales the input tensor in place.
    """

    def __init__(self, raise_on_call=None, mutate_input=False):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.frozen = nn.Linear(16, 16)
        self.head = nn.Sequential(nn.Dropout(0.25), nn.Linear(16, 4))
        self.frozen.requires_grad_(False)
        self.train()
        self.head.eval()
        g = torch.Generator().manual_seed(1)
        for p in self.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=g) + 3.0  # non-zero
        self.raise_on_call = raise_on_call
        self.mutate_input = mutate_input
        self.calls = 0

    def forward(self, x):
        if self.mutate_input:
            x.mul_(1.5)
        h = self.encoder(x)
        self.calls += 1
        if self.calls == self.raise_on_call:
            raise RuntimeError(f"planted failure on forward call {self.calls}")
        return self.head(h + self.frozen(h))


def _batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)


def _process_state():
    import torch.nn.modules.module as module_mod

    state = global_state_fingerprint()
    state.update({
        "inference_mode": torch.is_inference_mode_enabled(),
        "anomaly_check_nan": torch.is_anomaly_check_nan_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "dispatch_modes": torch._C._len_torch_dispatch_stack(),
        "function_modes": torch._C._len_torch_function_stack(),
        "profiler": torch.autograd._profiler_enabled(),
        "global_module_hooks": tuple(len(getattr(module_mod, name)) for name in (
            "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
            "_global_backward_pre_hooks")),
        "warning_filters": list(warnings.filters),
    })
    return state


SCENARIOS = {
    # scenario: (Subject keyword arguments, which configuration of CONFIGS)
    "passing": ({}, 0),
    "failing": ({}, 1),
    "raises_on_first_forward": ({"raise_on_call": 1}, 0),
    "raises_on_second_forward": ({"raise_on_call": 2}, 0),
    "raises_on_second_forward_failing": ({"raise_on_call": 2}, 1),
    "mutates_its_input": ({"mutate_input": True}, 1),
}


def test_every_registered_check_has_a_configuration():
    missing = sorted(set(all_checks()) - set(CONFIGS))
    assert not missing, (f"checks without an entry in CONFIGS of {__file__}: {missing}; add"
                         " (arguments with which it passes, arguments with which it fails) on Subject()")


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("name", sorted(all_checks()))
def test_check_leaves_model_batch_and_globals_unchanged(name, scenario, fake_timer):
    if name not in CONFIGS:
        pytest.fail(f"check {name!r} has no entry in CONFIGS of {__file__}; add (arguments with"
                    " which it passes, arguments with which it fails) on Subject()")
    fake_timer(then=0.25)
    model_kwargs, which = SCENARIOS[scenario]
    args = CONFIGS[name][which]
    check = all_checks()[name]
    model, batch = Subject(**model_kwargs), _batch()
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)

    model_before = model_fingerprint(model)
    batch_before = [t.detach().clone() for t in batch]
    process_before = _process_state()

    result = check(**args, model=model, batch=batch)

    assert _process_state() == process_before
    assert fingerprints_equal(model_before, model_fingerprint(model)) == []
    assert all(tensors_identical(a, b) for a, b in zip(batch_before, batch))
    assert model.calls == 0, "the check ran the caller's model instead of a copy"
    assert model.training and not model.head.training and model.encoder.training

    if scenario == "passing":
        assert result.passed is True, result.headline
    elif scenario == "failing":
        assert result.passed is False, result.headline
    elif scenario == "raises_on_first_forward":
        assert result.passed is False
        assert "planted failure on forward call 1" in result.headline
