"""Every registered check leaves the caller's model, batch and process exactly as they were.

Parametrized over ``all_checks()``, so a check added later is covered from the day it is
registered (and fails here until it has an entry in CONFIGS). Each check runs in a passing and a
failing configuration, on a model that raises halfway through forward, and on one that changes
its input in place; every time, the model (parameter and buffer bytes, ``.grad``,
``requires_grad``, training flags, hooks), the batch tensors and the global state (RNG states,
grad mode, default dtype, warning filters, active torch modes...) must be bitwise identical.
"""
import random
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR
import torch.nn.functional as F
from torch import nn

from pytest_modelcheck.checks import all_checks
from pytest_modelcheck.core.state import (
    fingerprints_equal,
    global_state_fingerprint,
    model_fingerprint,
    tensors_identical,
)


def _two_terms(out, target):
    ce = F.cross_entropy(out, target)
    return {"ce": ce, "ce_small": 0.01 * ce}  # ratio 100


def _nan_in_backward(out, target):
    # sqrt at zero: the forward is finite (the extra term is 0), every gradient is NaN
    return F.cross_entropy(out, target) + torch.sqrt((out - out).pow(2).sum())


# check name -> (arguments with which it passes, arguments with which it fails) on Subject(),
# and, for a check that no argument can make fail on a healthy model, a third element: the
# Subject() keyword arguments that plant the bug it finds
CONFIGS = {
    "grads_finite": ({}, {"loss": _nan_in_backward}),
    "shapes_consistent": ({"out": ("B", 4)}, {"out": ("B", 5)}),
    "model_overfits": ({"steps": 8, "lr": 0.05, "target_ratio": 0.9}, {"steps": 2, "target": 0.0}),
    # on the fake clock: 8 samples every 0.25 s = 32 samples/s
    "throughput_at_least": ({"rate": "1 samples/s", "warmup": 1, "min_runs": 3},
                            {"rate": "1e12 samples/s", "warmup": 1, "min_runs": 3}),
    "memory_under": ({"limit": "64 GiB"}, {"limit": "1 B"}),
    "no_host_sync": ({}, {}, {"host_sync": True}),
    "vectorized": ({}, {}, {"python_loop": True}),
    "batch_independent": ({}, {"mode": "train"}),  # train-mode BatchNorm mixes samples
    "params_learn": ({}, {"frozen": ["head.*"]}),  # declared frozen but still trained
    "eval_deterministic": ({}, {}, {"noisy_eval": True}),
    "stateless_forward": ({"ignore": ["calls"]}, {}),  # Subject counts its calls
    "state_roundtrip": ({}, {"factory": lambda: nn.Linear(6, 4)}),
    "device_portable": ({}, {}, {"cpu_constant": True}),
    "dtype_stable": ({}, {}, {"float64": True}),
    "activations_healthy": ({}, {"max_growth": 1.0}),
    "output_range": ({"ranges": (-1e6, 1e6)}, {"ranges": (0, 1e-9)}),
    "permutation_invariant": ({"dim": 0}, {"dim": 0}),
    "permutation_equivariant": ({"dim": 0}, {"dim": 0}, {"positional": True}),
    "padding_invariant": ({"mask": 0, "input_index": (), "dim": 0},
                          {"mask": 0, "input_index": (), "dim": 0}, {"positional": True}),
    "operator_stable": ({"examples": 5}, {"examples": 5, "max_sensitivity": 1e-9}),
    "data_sane": ({}, {"spec": {0: {"range": (0, 1)}}}),  # randn inputs leave [0, 1]
    "lr_schedule": ({"scheduler": lambda opt: CosineAnnealingLR(opt, T_max=10), "expected": "cosine",
                     "steps": 10},
                    {"scheduler": lambda opt: CosineAnnealingLR(opt, T_max=5), "expected": "cosine",
                     "steps": 10}),
    "grad_norms_stable": ({"steps": 5}, {"steps": 5, "min_norm": 1e6}),
    "loss_components": ({"steps": 3, "loss": _two_terms},
                        {"steps": 3, "loss": _two_terms, "max_ratio": 10}),
    "flops_under": ({"limit": "1M"}, {"limit": 100}),
    "params_under": ({"limit": "1M"}, {"limit": 100}),
    "unet_skips": ({"sizes": [6]}, {"sizes": [5]}),  # size 5 breaks Linear(6, 16)
    "vit_patches": ({"sizes": [6]}, {"sizes": [5]}),
    "fno_modes": ({}, {"grid_sizes": [5]}),
    "spectrum_matches": ({}, {"max_band_ratio": 1.5}),
    # rows as positions: in eval they are independent (causal); dropout left on in eval makes
    # two runs differ, which causal reports instead of judging
    "causal": ({"dim": 0}, {"dim": 0}, {"noisy_eval": True}),
    "kv_cache_consistent": ({}, {}),
    # Subject's train-mode BatchNorm normalises each rank's shard with its own statistics
    "ddp_consistent": ({"local_batchnorm": True}, {}),
    "tied_parameters": ({"tied": [("frozen.weight", "encoder.0.weight")]},
                        {"tied": [("frozen.weight", "encoder.0.weight")]}),
    "norm_stats": ({}, {"frozen": ("encoder.*",)}),  # encoder.1 is declared frozen but trains
    "head_range": ({"target_range": (None, None)}, {"target_range": (None, None)},
                   {"bounded_head": True}),
    "discriminator_scales": ({"discriminator": "head", "plot": None},
                             {"discriminator": "head", "plot": None}),
    "gan_pairs": ({"pairs": lambda c, v: torch.cat([c, v[:, None]], 1)},
                  {"pairs": lambda c, r, f: (torch.cat([c, r[:, None]], 1),
                                             torch.cat([f[:, None], c], 1))}),
    "mode_sweep": ({"plot": None}, {"plot": None, "dead_tol": 0.5}),
    "no_aliasing": ({"plot": None}, {"plot": None, "max_ratio": 1e-9}),
    "attention_maps": ({"plot": False}, {"plot": False}),
    "token_capacity": ({"max_tokens": 100}, {"max_tokens": 100}),
}


class Subject(nn.Module):
    """BatchNorm buffers, dropout, a frozen layer, a head left in eval mode, existing gradients.

    ``raise_on_call=k`` raises on the k-th forward of each copy, after the encoder ran;
    ``mutate_input`` scales the input tensor in place; ``host_sync`` branches on a tensor's
    value in Python; ``python_loop`` runs the head sample by sample; ``noisy_eval`` leaves
    dropout on in eval.
    """

    def __init__(self, raise_on_call=None, mutate_input=False, host_sync=False, python_loop=False,
                 noisy_eval=False, cpu_constant=False, float64=False, positional=False,
                 bounded_head=False):
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
        self.host_sync = host_sync
        self.python_loop = python_loop
        self.noisy_eval = noisy_eval
        self.cpu_constant = cpu_constant
        self.float64 = float64
        self.positional = positional
        self.bounded_head = bounded_head
        self.calls = 0

    def forward(self, x):
        if self.mutate_input:
            x.mul_(1.5)
        h = self.encoder(x)
        self.calls += 1
        if self.calls == self.raise_on_call:
            raise RuntimeError(f"planted failure on forward call {self.calls}")
        h = h + self.frozen(h)
        if self.noisy_eval:
            h = F.dropout(h, 0.1)  # dropout left on in eval: training= not passed
        if self.host_sync and bool((h.detach().abs() > 1e6).any()):
            h = h.clamp(-1e6, 1e6)
        if self.python_loop:
            out = torch.stack([self.head(row) for row in h])
        else:
            out = self.head(h)
        if self.cpu_constant:  # a tensor created without device=
            out = out + torch.zeros(out.shape[-1])
        if self.float64:  # a numpy float64 scalar promotes the output
            out = out * torch.tensor(np.float64(1.0))
        if self.positional:  # position information leaks into the output
            out = out + torch.linspace(0, 1, out.shape[0], device=out.device).unsqueeze(1)
        if self.bounded_head:  # a sigmoid on the output: bounded to (0, 1)
            out = torch.sigmoid(out)
        return out


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

# (check, scenario) -> why its outcome is known to be wrong; the state must be kept all the same
KNOWN_WRONG_OUTCOMES: dict = {
    ("permutation_invariant", "passing"): "Subject has no set dimension: a permutation of the"
    " batch moves its rows",
    ("spectrum_matches", "passing"): "Subject's target is class labels, not a field: the check skips",
    ("spectrum_matches", "failing"): "Subject's target is class labels, not a field: the check skips",
    ("kv_cache_consistent", "passing"): "Subject has no cache (and is no sequence model for a"
    " step_fn): the check skips",
    ("kv_cache_consistent", "failing"): "Subject has no cache: the check skips",
    ("kv_cache_consistent", "raises_on_first_forward"): "Subject has no cache: the check skips"
    " before any forward",
    ("fno_modes", "passing"): "Subject runs no FFT: the check skips (no spectral layer found)",
    ("fno_modes", "failing"): "Subject runs no FFT: the check skips (no spectral layer found)",
    ("unet_skips", "passing"): "Subject concatenates nothing: the check skips (no skip"
    " connection found)",
    ("vit_patches", "passing"): "Subject has no patch embedding: the check skips",
    ("vit_patches", "failing"): "Subject has no patch embedding: the check skips",
    ("tied_parameters", "passing"): "Subject ties no parameters: a declared pair fails as built",
    ("tied_parameters", "raises_on_first_forward"): "a declared pair fails as built, before any"
    " forward",
    ("discriminator_scales", "passing"): "Subject's output (8, 4) and target (8,) are not"
    " generated/real samples of one shape: the check skips",
    ("discriminator_scales", "failing"): "Subject's output (8, 4) and target (8,) are not"
    " generated/real samples of one shape: the check skips",
    ("gan_pairs", "raises_on_first_forward"): "gan_pairs never runs the model: it probes the pair"
    " builder",
    ("mode_sweep", "passing"): "Subject runs no FFT: the check skips (no spectral layer found)",
    ("mode_sweep", "failing"): "Subject runs no FFT: the check skips (no spectral layer found)",
    ("no_aliasing", "passing"): "Subject's input is no (B, C, *spatial) field: the check skips"
    " (before any forward)",
    ("no_aliasing", "failing"): "Subject's input is no (B, C, *spatial) field: the check skips"
    " (before any forward)",
    ("no_aliasing", "raises_on_first_forward"): "Subject's input is no (B, C, *spatial) field:"
    " the check skips (before any forward)",
    ("attention_maps", "passing"): "Subject runs no attention: the check skips",
    ("attention_maps", "failing"): "Subject runs no attention: the check skips",
    ("token_capacity", "passing"): "Subject has no patch embedding: the check skips",
    ("token_capacity", "failing"): "Subject has no patch embedding: the check skips",
}


@pytest.fixture(scope="module", autouse=True)
def torch_lazy_imports_done():
    """Let torch finish the lazy imports that the first check in a process triggers.

    ``preserved_globals`` calls ``torch.use_deterministic_algorithms``, whose first call imports
    torch._inductor and with it sympy, which adds a warnings filter at import time. Done here
    once, so that no test depends on running first in its worker;
    ``test_first_check_in_a_fresh_process_leaves_warning_filters_alone`` covers that case.
    """
    torch.use_deterministic_algorithms(torch.are_deterministic_algorithms_enabled(),
                                       warn_only=torch.is_deterministic_algorithms_warn_only_enabled())


def _observe(call, model_kwargs=None):
    """``call(model, batch)`` on a fresh Subject and batch; return (its result, what changed)."""
    model, batch = Subject(**(model_kwargs or {})), _batch()
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)

    model_before = model_fingerprint(model)
    batch_before = [t.detach().clone() for t in batch]
    process_before = _process_state()

    result = call(model, batch)

    process_after = _process_state()
    changed = [f"global state: {k}" for k in process_before if process_before[k] != process_after[k]]
    changed += [f"model: {d}" for d in fingerprints_equal(model_before, model_fingerprint(model))]
    changed += [f"batch[{i}]" for i, (a, b) in enumerate(zip(batch_before, batch))
                if not tensors_identical(a, b)]
    if model.calls:
        changed.append("the caller's model ran")
    return result, changed


def _run(name, scenario):
    """Run one registered check in one scenario; return (its result, what changed)."""
    if name not in CONFIGS:
        pytest.fail(f"check {name!r} has no entry in CONFIGS of {__file__}; add (arguments with"
                    " which it passes, arguments with which it fails) on Subject() to CONFIGS")
    model_kwargs, which = SCENARIOS[scenario]
    args = CONFIGS[name][which]
    if which == 1 and len(CONFIGS[name]) > 2:
        model_kwargs = dict(model_kwargs, **CONFIGS[name][2])
    check = all_checks()[name]
    return _observe(lambda model, batch: check(**args, model=model, batch=batch), model_kwargs)


def test_every_registered_check_has_a_configuration():
    missing = sorted(set(all_checks()) - set(CONFIGS))
    assert not missing, (f"checks without an entry in CONFIGS of {__file__}: {missing}; add"
                         " (arguments with which it passes, arguments with which it fails) on Subject()")


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("name", sorted(all_checks()))
def test_check_leaves_model_batch_and_globals_unchanged(name, scenario, fake_timer):
    fake_timer(then=0.25)
    result, changed = _run(name, scenario)
    assert changed == [], f"{name} ({scenario}, {result.status}: {result.headline})"


def _outcome_cases():
    for name in sorted(all_checks()):
        for scenario in ("passing", "failing", "raises_on_first_forward"):
            reason = KNOWN_WRONG_OUTCOMES.get((name, scenario))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(name, scenario, marks=marks, id=f"{name}-{scenario}")


@pytest.mark.parametrize("name, scenario", list(_outcome_cases()))
def test_configurations_have_the_declared_outcome(name, scenario, fake_timer):
    """The scenarios above really take the passing, failing and raising paths of each check."""
    fake_timer(then=0.25)
    result, _ = _run(name, scenario)
    if scenario == "passing":
        assert result.passed is True, result.headline
    elif scenario == "failing":
        assert result.passed is False, result.headline
        assert not result.headline.startswith("forward raised"), result.headline
    else:
        assert result.passed is False, result.headline
        assert ("forward raised RuntimeError in module 'Subject' (Subject): planted failure on"
                " forward call 1") in result.headline


@pytest.mark.parametrize("change, expected", [
    (lambda m, b: m.head[1].weight.grad.zero_(), "model: head.1.weight (.grad)"),
    (lambda m, b: setattr(m.encoder[0].bias, "grad", None), "model: encoder.0.bias (.grad)"),
    (lambda m, b: m.head.train(), "model: training flags"),
    (lambda m, b: m.frozen.weight.requires_grad_(True), "model: frozen.weight (requires_grad)"),
    (lambda m, b: m.encoder[1].running_mean.add_(1), "model: encoder.1.running_mean (buffer)"),
    (lambda m, b: m.head[1].weight.data.add_(1e-7), "model: head.1.weight (value)"),
    (lambda m, b: m.head.register_forward_hook(lambda *a: None), "model: hooks"),
    (lambda m, b: b[0][3, 2].mul_(-1), "batch[0]"),
    (lambda m, b: m.eval()(b[0]), "the caller's model ran"),
    (lambda m, b: torch.rand(1), "global state: torch_rng"),
    (lambda m, b: np.random.rand(), "global state: numpy_rng"),
    (lambda m, b: random.random(), "global state: python_rng"),
    (lambda m, b: torch.set_grad_enabled(False), "global state: grad"),
    (lambda m, b: torch.set_default_dtype(torch.float64), "global state: default_dtype"),
    (lambda m, b: warnings.simplefilter("ignore", ResourceWarning), "global state: warning_filters"),
], ids=["grad", "grad_removed", "mode", "requires_grad", "buffer", "value", "hook", "batch", "ran",
        "torch_rng", "numpy_rng", "python_rng", "grad_mode", "dtype", "warnings"])
def test_the_comparison_notices_each_kind_of_change(change, expected):
    try:
        with warnings.catch_warnings():
            _, changed = _observe(change)
    finally:
        torch.set_grad_enabled(True)
        torch.set_default_dtype(torch.float32)
    assert expected in changed


def test_first_check_in_a_fresh_process_leaves_warning_filters_alone():
    code = ("import warnings, torch\n"
            "from pytest_modelcheck.checks import shapes_consistent\n"
            "before = list(warnings.filters)\n"
            "shapes_consistent(('B', 3), model=torch.nn.Linear(4, 3), batch=torch.zeros(2, 4))\n"
            "print([f for f in warnings.filters if f not in before])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
