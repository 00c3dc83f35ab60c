"""estimate_memory: hand-derived parts of a scaled-down LLaMA-like step, amp, batch sizes."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest
import torch

from pytest_modelcheck.core.errors import UsageError
from pytest_modelcheck.core.memory import MemoryEstimate, estimate_memory

_SPEC = importlib.util.spec_from_file_location(
    "llama_like", pathlib.Path(__file__).parents[2] / "benchmarks" / "llama_like.py")
llama = sys.modules.setdefault("llama_like", importlib.util.module_from_spec(_SPEC))
if not hasattr(llama, "LlamaLike"):
    _SPEC.loader.exec_module(llama)

CFG = llama.LlamaConfig(d_model=256, n_layers=2, n_heads=4, d_ff=512, vocab=1000)
# embedding 1000*256 = 256000; per layer 4*256*256 (q,k,v,o) + 3*256*512 (SwiGLU) + 2*256 (norms)
# = 262144 + 393216 + 512 = 655872; final norm 256; head 256*1000 = 256000
N = 256000 + 2 * 655872 + 256 + 256000  # = 1824000
TENSORS = 3 + 9 * 2  # embedding, final norm, head + 9 per layer (4 attention, 3 MLP, 2 norms)
SEQ = 32


def factory():
    return llama.LlamaLike(CFG)


def make_batch(n):
    return llama.make_batch(n, SEQ, CFG.vocab)


def estimate(**kwargs):
    return estimate_memory(factory, make_batch, loss=llama.lm_loss, **kwargs)


def test_parameter_gradient_and_adamw_bytes_are_exact():
    assert CFG.parameter_count() == N == 1824000
    e = estimate(batch_sizes=[2])
    assert e.parameter_count == N
    assert e.parameters_bytes == 4 * N  # fp32 weights: 4 bytes x N
    assert e.gradients_bytes == 4 * N  # one fp32 gradient per parameter
    # AdamW: 2 states x 4 bytes x N params, plus a 4-byte float32 step counter per tensor
    assert e.optimizer_state_bytes == 2 * 4 * N + 4 * TENSORS
    assert e.peak_phase in ("forward", "backward", "optimizer step")
    assert e.peak_bytes >= e.parameters_bytes + e.gradients_bytes + e.optimizer_state_bytes
    assert e.batch_size == 2 and e.optimizer == "adamw" and e.amp is None


def test_amp_bf16_lowers_activation_bytes_plausibly():
    # 8 x 128 = 1024 tokens, so activations outweigh the bf16 weight copies autocast caches
    # (2 bytes x N = 3.6 MB), which count as activations too and dominate at a few tokens.
    def tokens(n):
        return llama.make_batch(n, 128, CFG.vocab)

    fp32, bf16, fp16 = (estimate_memory(factory, tokens, loss=llama.lm_loss, batch_sizes=[8],
                                        amp=amp) for amp in (None, "bf16", "fp16"))
    assert bf16.activations_bytes < fp32.activations_bytes
    assert fp16.activations_bytes < fp32.activations_bytes
    # Not everything halves (norms compute in fp32, autocast caches bf16 weight copies), but the
    # matmul outputs do: well below fp32 and above a quarter of it.
    assert fp32.activations_bytes / 4 < bf16.activations_bytes
    # weights, gradients and optimizer state stay fp32 under autocast
    assert bf16.parameters_bytes == fp32.parameters_bytes == 4 * N
    assert bf16.gradients_bytes == 4 * N


def test_batch_sizes_give_growing_activation_bytes():
    e = estimate(batch_sizes=[1, 2, 4, 8])
    rows = e.per_batch_size
    assert [r["batch_size"] for r in rows] == [1, 2, 4, 8]
    acts = [r["activations_bytes"] for r in rows]
    assert acts == sorted(acts) and len(set(acts)) == 4
    assert [r["parameters_bytes"] for r in rows] == [4 * N] * 4
    peaks = [r["peak_bytes"] for r in rows]
    assert peaks == sorted(peaks)
    assert json.loads(json.dumps(e.to_dict()))["per_batch_size"][3]["batch_size"] == 8
    assert "batch" in e.render()


def test_meta_factory_allocates_nothing():
    seen = []

    def big():
        seen.append(torch.empty(1).device.type)  # the factory runs under torch.device("meta")
        return torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.ReLU(),
                                   torch.nn.Linear(4096, 4096))  # 128 MiB of fp32 weights

    from pytest_modelcheck.core.memory import allocation_profiler

    with allocation_profiler() as prof:
        e = estimate_memory(big, torch.empty(64, 4096, device="meta"), phase="inference")
    allocated = sum(ev.nbytes() for ev in prof.profiler.kineto_results.events()
                    if ev.name() == "[memory]" and ev.nbytes() > 0)
    assert seen == ["meta"]
    assert allocated < 2**20  # bookkeeping scalars only; no 64 MiB weight, no 1 MiB activation
    assert e.parameters_bytes == 4 * (2 * 4096 * 4096 + 2 * 4096)
    assert e.peak_phase == "forward" and e.optimizer is None


def test_module_activations_name_modules_inside_module_lists():
    e = estimate(batch_sizes=[2])
    names = [name for name, _ in e.module_activations]
    assert "lm_head" in names and any(n.startswith("layers.0.") for n in names)
    assert "<root>" not in names[:3]


def test_real_module_is_used_as_is():
    model = torch.nn.Linear(8, 4)
    before = model.weight.detach().clone()
    e = estimate_memory(model, (torch.ones(3, 8), torch.ones(3, 4)), loss="mse")
    assert e.parameters_bytes == 4 * (8 * 4 + 4)  # 36 floats
    assert isinstance(e, MemoryEstimate) and e.per_batch_size[0]["batch_size"] == 3
    assert torch.equal(model.weight, before) and model.weight.grad is None


@pytest.mark.parametrize("kwargs, match", [
    ({"amp": "int8"}, r"^amp='int8': expected 'bf16', 'fp16' or None$"),
    ({"batch_sizes": [0, 2]}, r"^batch_sizes=\[0, 2\]: expected a list of positive integers$"),
    ({"phase": "eval"}, r"^phase='eval': expected"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(UsageError, match=match):
        estimate(**kwargs)


def test_factory_must_return_a_module():
    with pytest.raises(UsageError, match="the factory returned int"):
        estimate_memory(lambda: 3, torch.ones(2, 2))
