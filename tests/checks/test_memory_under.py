"""The memory_under check, called directly."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pytest_modelcheck.checks import memory_under
from pytest_modelcheck.core.errors import UsageError
from pytest_modelcheck.core.result import CheckResult
from pytest_modelcheck.core.state import fingerprints_equal, model_fingerprint
from pytest_modelcheck.core.units import format_bytes


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10))


def small_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)


def with_grads(model, batch):
    """The caller's model as a test leaves it: gradients present, eval mode."""
    x, y = batch
    nn.functional.cross_entropy(model(x), y).backward()
    model.eval()
    return model


def test_passes_under_a_generous_limit():
    result = memory_under("1 GiB", model=small_model(), batch=small_batch())
    assert result.passed is True, result.format()
    assert result.check == "memory_under"
    assert result.headline.startswith("expected peak memory of a training step under 1.00 GiB,"
                                      " observed ")
    assert "measured: cpu allocator events" in result.headline
    assert "\n" not in result.headline
    m = result.metrics
    assert m["limit_bytes"] == 2**30 and 0 < m["peak_bytes"] < 2**30
    assert m["peak_phase"] in ("forward", "backward", "optimizer step")
    assert m["method"] == "cpu allocator events (torch.profiler)" and m["estimated"] is False
    assert m["breakdown"]["parameters"] == sum(p.numel() * 4 for p in small_model().parameters())
    assert "remedy" not in result.details


def test_fails_under_a_tiny_limit_with_expected_and_observed():
    result = memory_under("4 KiB", model=small_model(), batch=small_batch())
    assert result.passed is False
    peak = result.metrics["peak_bytes"]
    assert result.headline.startswith("expected peak memory of a training step under 4.00 KiB")
    assert f"observed {format_bytes(peak)}" in result.headline
    assert f"(peak in {result.metrics['peak_phase']};" in result.headline
    assert "remedy:" in result.details and "over the limit by" in result.details
    assert "parameters" in result.details  # the breakdown table


def test_inference_phase():
    result = memory_under("1 GiB", "inference", model=small_model(), batch=small_batch())
    assert result.passed
    assert "an inference step" in result.headline
    assert result.metrics["peak_phase"] == "forward" and result.metrics["phase"] == "inference"


@pytest.mark.parametrize("limit", ["4 KiB", "1 GiB"])
def test_the_callers_model_batch_and_rng_are_untouched(limit):
    batch = small_batch()
    model = with_grads(small_model(), batch)
    before = model_fingerprint(model)
    x0, y0 = batch[0].clone(), batch[1].clone()
    rng = torch.get_rng_state()
    result = memory_under(limit, model=model, batch=batch)
    assert result.passed is (limit == "1 GiB")
    assert fingerprints_equal(before, model_fingerprint(model)) == []
    assert torch.equal(batch[0], x0) and torch.equal(batch[1], y0)
    assert torch.equal(rng, torch.get_rng_state())


def test_bad_limit_is_a_one_line_usage_error():
    with pytest.raises(UsageError) as info:
        memory_under("12 parsecs", model=small_model(), batch=small_batch())
    message = str(info.value)
    assert message.startswith("limit='12 parsecs': expected ")
    assert "\n" not in message
    with pytest.raises(UsageError, match=r"^limit=0: expected a positive size"):
        memory_under(0, model=small_model(), batch=small_batch())


def test_bad_phase_and_optimizer_are_usage_errors():
    with pytest.raises(UsageError, match=r"^phase='eval': expected 'train' or 'inference'$"):
        memory_under("1 GiB", phase="eval", model=small_model(), batch=small_batch())
    with pytest.raises(UsageError, match=r"^optimizer='lion'"):
        memory_under("1 GiB", optimizer="lion", model=small_model(), batch=small_batch())


def test_validation_happens_at_binding_time():
    spec = memory_under.spec
    values = spec.bind(("512 MiB",), {"phase": "inference"})
    assert values["limit"] == 512 * 2**20 and values["optimizer"] == "adam"
    assert spec.marker_help().startswith(
        "memory_under(limit, phase='train', optimizer='adam', *, world_size=None, strategy=None,"
        " loss=None, device=None):")


def test_result_is_serializable():
    result = memory_under("1 GiB", model=small_model(), batch=small_batch())
    data = json.loads(json.dumps(result.to_dict()))
    assert CheckResult.from_dict(data).metrics == result.metrics


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path taken without CUDA")
def test_cuda_without_a_gpu_is_estimated():
    result = memory_under("1 GiB", model=small_model(), batch=small_batch(), device="cuda")
    assert result.passed is True and result.estimated is True
    assert ", estimated " in result.headline and "estimated for cuda: fake tensors" in result.headline
    assert result.metrics["device"] == "cuda (estimated on CPU)"
    failing = memory_under("4 KiB", model=small_model(), batch=small_batch(), device="cuda")
    assert failing.passed is False and failing.estimated


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path taken without CUDA")
def test_a_step_that_cannot_be_estimated_is_skipped():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(x) if x.sum().item() > 0 else -self.lin(x)

    result = memory_under("1 GiB", model=Branchy(), batch=torch.randn(4, 8), device="cuda")
    assert result.passed is None
    assert "cannot estimate" in result.headline and "tensor values" in result.headline


def test_meta_model_is_estimated():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10))
    result = memory_under("64 MiB", model=model,
                          batch=(torch.randn(8, 4096), torch.randint(0, 10, (8,))))
    # 64 MiB of weights alone, then gradients and Adam state: far over 64 MiB
    assert result.passed is False and result.estimated
    assert result.metrics["breakdown"]["parameters"] >= 4096 * 4096 * 4


def test_model_error_becomes_a_failed_result():
    result = memory_under("1 GiB", model=nn.Linear(3, 2), batch=torch.randn(4, 5))
    assert result.passed is False
    assert "forward raised" in result.headline


def test_per_rank_limit_with_fsdp_and_ddp():
    model, batch = small_model(), small_batch()
    fsdp = memory_under("1 GiB", world_size=4, strategy="fsdp", model=model,
                        batch=batch)
    assert fsdp.passed and fsdp.estimated
    assert "per-rank peak memory" in fsdp.headline and "fsdp on 4 ranks" in fsdp.headline
    row = fsdp.metrics["per_rank"]
    assert row["world_size"] == 4 and fsdp.metrics["peak_bytes"] == row["peak_bytes"]
    ddp = memory_under("4 KiB", world_size=2, strategy="ddp", model=model, batch=batch)
    assert not ddp.passed and "over the limit by" in ddp.details
    assert ddp.metrics["peak_bytes"] > fsdp.metrics["peak_bytes"]


@pytest.mark.parametrize("kwargs, name", [
    ({"world_size": 0, "strategy": "ddp"}, "world_size"),
    ({"world_size": 2, "strategy": "zero3"}, "strategy"),
    ({"strategy": "fsdp"}, "strategy")])
def test_per_rank_arguments_are_checked_with_one_line(kwargs, name):
    spec = memory_under.spec
    assert spec.bind(("1 GiB",), {"world_size": 2, "strategy": "DDP"})["strategy"] == "ddp"
    with pytest.raises(UsageError):
        spec.bind(("1 GiB",), kwargs)
    with pytest.raises(UsageError) as info:
        memory_under("1 GiB", model=small_model(), batch=small_batch(), **kwargs)
    assert str(info.value).startswith(name + "=") and "\n" not in str(info.value)
