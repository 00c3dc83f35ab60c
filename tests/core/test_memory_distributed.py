"""Per-rank memory of data-parallel training: the arithmetic model and one real 2-rank DDP run."""
from __future__ import annotations

import pytest
import torch

from pytest_modelcheck.core.errors import UsageError
from pytest_modelcheck.core.memory import estimate_memory
from pytest_modelcheck.core.memory.distributed import (check_distributed, gathered_bytes,
                                                       largest_unit_bytes, measure_per_rank,
                                                       unit_bytes)


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(),
                               torch.nn.Linear(1024, 256))


def test_ddp_estimate_within_10_percent_of_two_gloo_ranks() -> None:
    model, batch = _mlp(), torch.randn(32, 256)
    est = estimate_memory(model, batch, world_size=2, strategy="ddp")
    peaks = measure_per_rank(model, batch, world_size=2, strategy="ddp", timeout=120)
    assert len(peaks) == 2
    assert abs(est.per_rank["peak_bytes"] / max(peaks) - 1) < 0.10, (est.per_rank, peaks)


def test_fsdp_estimate_of_a_batch_taking_embedding_within_10_percent() -> None:
    """The embedding takes the batch (indices, no gradient): FSDP2 keeps its gathered
    parameters until the end of backward, beside its gradients and the reduce-scatter input."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(4096, 128), torch.nn.Linear(128, 128))
    batch = torch.randint(0, 4096, (8, 16))
    est = estimate_memory(model, batch, world_size=2, strategy="fsdp")
    peaks = measure_per_rank(model, batch, world_size=2, strategy="fsdp", timeout=120, repeats=2)
    assert abs(est.per_rank["peak_bytes"] / max(peaks) - 1) < 0.10, (est.per_rank, peaks)


def test_without_world_size_nothing_changes() -> None:
    est = estimate_memory(_mlp(), torch.ones(4, 256))
    assert est.per_rank is None and "per_rank" not in est.to_dict()
    assert "per rank" not in est.render()


def test_fsdp_divides_state_and_adds_unit_buffers() -> None:
    model = _mlp()
    single = estimate_memory(model, torch.ones(4, 256))
    est = estimate_memory(model, torch.ones(4, 256), world_size=8, strategy="fsdp")
    row = est.per_rank
    assert row["parameters_bytes"] == -(-single.parameters_bytes // 8)
    assert row["optimizer_state_bytes"] == -(-single.optimizer_state_bytes // 8)
    assert row["communication_buffers_bytes"] == (gathered_bytes(unit_bytes(model))
                                                  + largest_unit_bytes(model))
    assert row["peak_bytes"] < single.peak_bytes
    assert "per rank with fsdp on 8 ranks" in est.render()
    assert est.to_dict()["per_rank"]["world_size"] == 8


def test_ddp_adds_gradient_buckets() -> None:
    est = estimate_memory(_mlp(), torch.ones(4, 256), world_size=4, strategy="ddp")
    assert est.per_rank["peak_bytes"] == est.peak_bytes + est.gradients_bytes


@pytest.mark.parametrize("world_size, strategy, name", [
    (0, "ddp", "world_size"), (2.5, "ddp", "world_size"), (True, "ddp", "world_size"),
    (2, "zero", "strategy"), (2, None, "strategy"), (None, "ddp", "strategy")])
def test_bad_arguments_name_the_argument(world_size: object, strategy: object,
                                         name: str) -> None:
    with pytest.raises(UsageError) as info:
        check_distributed(world_size, strategy)
    assert str(info.value).startswith(name + "=") and "\n" not in str(info.value)
