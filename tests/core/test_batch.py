"""Batch: how a user's batch is split into inputs and target, and moved."""
from __future__ import annotations

import torch

from pytest_modelcheck.core.batch import Batch


def _dict_batch() -> dict:
    return {"x": torch.randn(4, 3), "targets": torch.randn(4, 2)}


def test_a_dict_batch_moves_its_target_with_its_inputs() -> None:
    # The target of a dict batch stays inside the dict the model receives; after .to() or
    # .clone() it must be the moved tensor, not the caller's original.
    original = Batch.from_user(_dict_batch())
    assert original.target_key == "targets"
    moved = original.to("meta")
    assert moved.target.device.type == "meta"
    assert moved.target is moved.args[0]["targets"]
    cloned = original.clone()
    assert cloned.target is cloned.args[0]["targets"]
    assert cloned.target is not original.target and torch.equal(cloned.target, original.target)


def test_a_tuple_batch_moves_its_target() -> None:
    moved = Batch.from_user((torch.randn(4, 3), torch.randn(4, 2))).to("meta")
    assert moved.target.device.type == "meta" and moved.args[0].device.type == "meta"


def test_a_factory_batch_resized_on_a_device_stays_on_that_device() -> None:
    # make_batch(n) builds CPU tensors; once the batch was moved (to the GPU in real runs),
    # every resized batch must be made on the same device as the one it replaces.
    def make_batch(n: int) -> dict:
        return {"x": torch.randn(n, 3), "targets": torch.randn(n, 2)}

    moved = Batch.from_user(make_batch).to("meta")
    assert moved.factory is make_batch
    for n in (1, 3):
        resized = moved.resized(n)
        assert resized.args[0]["x"].device.type == "meta", n
        assert resized.target.device.type == "meta" and resized.target.shape == (n, 2)
    on_cpu = Batch.from_user(make_batch).resized(2)
    assert on_cpu.target.device.type == "cpu"
