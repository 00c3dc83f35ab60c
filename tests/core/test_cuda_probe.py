"""The CUDA kernel-workspace probe, through CPU stand-ins: what is probed and how it is
rebuilt, the child's protocol and its failures, and how probed workspaces enter an estimate.
The real thing (a GPU in the child) is checked in tests/gpu."""
from __future__ import annotations

import io
import json
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pytest_modelcheck.core import cuda_probe as P
from pytest_modelcheck.core import memory as M

aten = torch.ops.aten


def _meta(*shape, **kw):
    return torch.empty(*shape, device="meta", **kw)


# --- signatures --------------------------------------------------------------------------------

def test_views_optimizer_kernels_and_ops_without_tensors_are_not_probed() -> None:
    x = _meta(4, 6)
    assert P.op_signature(aten.view.default, (x, [24]), {}) is None
    assert P.op_signature(aten.t.default, (x,), {}) is None
    assert P.op_signature(aten._foreach_add_.Scalar, ([x], 1.0), {}) is None
    assert P.op_signature(aten.detach.default, (x,), {}) is None
    assert P.op_signature(aten.zeros.default, ([3, 4],), {"device": torch.device("cpu")}) is None
    assert P.op_signature(aten.mkldnn_rnn_layer.default, (x,), {}) is None


def test_a_signature_holds_layout_dtype_and_values() -> None:
    x = _meta(2, 3, 8, 8).to(memory_format=torch.channels_last)
    w = _meta(4, 3, 3, 3)
    sig = P.op_signature(aten.convolution.default,
                         (x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1), {})
    name, args, kwargs = json.loads(sig)
    assert name == "aten.convolution.default" and kwargs == {}
    assert args[0] == {"T": [2, 3, 8, 8], "S": list(x.stride()), "D": "float32"}
    assert args[2:] == [None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1]
    # the layout is part of the signature: cuDNN picks its engine by it
    y = _meta(2, 3, 8, 8)
    assert P.op_signature(aten.convolution.default,
                          (y, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1), {}) != sig
    sig = P.op_signature(aten._to_copy.default, (x,), {"dtype": torch.bfloat16,
                                                        "device": torch.device("cpu"),
                                                        "memory_format": torch.channels_last})
    assert json.loads(sig)[2] == {"dtype": {"dtype": "bfloat16"}, "device": {"device": 1},
                                  "memory_format": {"mf": "channels_last"}}


def test_arguments_the_child_cannot_rebuild_mean_no_probe() -> None:
    x = _meta(4)
    assert P.op_signature(aten.bernoulli.p, (x, 0.5), {"generator": torch.Generator()}) is None
    sparse = torch.zeros(4).to_sparse()
    assert P.op_signature(aten.add.Tensor, (sparse, sparse), {}) is None


def test_the_cpu_flash_attention_ops_map_to_sdpa_with_their_direction() -> None:
    q = _meta(2, 4, 16, 8)
    fwd = P.op_signature(aten._scaled_dot_product_flash_attention_for_cpu.default,
                         (q, q, q, 0.0, True), {"attn_mask": None, "scale": 0.5})
    name, direction, qkv, options = json.loads(fwd)
    assert (name, direction) == (P.SDPA, "forward") and len(qkv) == 3
    assert options == {"attn_mask": None, "dropout_p": 0.0, "is_causal": True, "scale": 0.5}
    qg = _meta(2, 4, 16, 8).requires_grad_()
    train = json.loads(P.op_signature(aten._scaled_dot_product_flash_attention_for_cpu.default,
                                      (qg, qg, qg), {}))
    assert train[1] == "train"
    lse = _meta(2, 4, 16)
    bwd = json.loads(P.op_signature(
        aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
        (q, q, q, q, q, lse, 0.0, False), {"attn_mask": _meta(16, 16), "scale": None}))
    assert bwd[1] == "backward" and bwd[3]["attn_mask"]["T"] == [16, 16]


# --- the child's side, on CPU --------------------------------------------------------------------

class _FixedMeter:
    workspace_bytes = 0

    def __init__(self, device) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.workspace = _FixedMeter.workspace_bytes


def test_decode_builds_zero_filled_tensors_of_the_same_layout() -> None:
    x = torch.randn(3, 1).expand(3, 5)          # stride 0
    y = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    i = torch.arange(6).view(2, 3).t()
    e = torch.empty(0, 4)
    sizes: list = []
    built = P._decode(P._encode([x, y, i, e, torch.float16, 3, None]), torch.device("cpu"),
                      sizes)
    for a, b in zip(built[:4], [x, y, i, e]):
        assert a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
        assert not a.any()
    assert built[4:] == [torch.float16, 3, None]
    assert sizes == [3 * 4, (2 * 3 * 4 * 5) * 4, 6 * 8, 0]


def test_probe_one_runs_the_op_and_refuses_operands_over_budget(monkeypatch) -> None:
    monkeypatch.setattr(P, "_Meter", _FixedMeter)
    _FixedMeter.workspace_bytes = 4096
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    sig = P.op_signature(aten.convolution.default,
                         (x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1), {})
    assert P._probe_one(sig, torch.device("cpu"), 1 << 30) == 4096
    assert P._probe_one(sig, torch.device("cpu"), 100) is None   # 1.9 KiB of operands
    q = torch.randn(1, 2, 8, 4)
    lse = torch.randn(1, 2, 8)
    for args, op in [((q, q, q), aten._scaled_dot_product_flash_attention_for_cpu.default),
                     ((q, q, q, q, q, lse, 0.0, False),
                      aten._scaled_dot_product_flash_attention_for_cpu_backward.default)]:
        sig = P.op_signature(op, args, {})
        assert P._probe_one(sig, torch.device("cpu"), 1 << 30) == 4096


def test_the_child_answers_a_line_per_request_and_quits_when_its_context_is_lost(
        monkeypatch) -> None:
    answers = iter([{"results": {"a": 1}}, {"results": {"b": None}, "context_lost": True},
                    {"results": {"never": 0}}])
    monkeypatch.setattr(P, "_serve", lambda request: next(answers))
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"ops": ["a"]}\n\n{"ops": ["b"]}\n'
                                                  '{"ops": ["c"]}\n'))
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    P.main()
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["results"] for line in lines] == [{"a": 1}, {"b": None}]


# --- the parent's side ---------------------------------------------------------------------------

def _fake_child(monkeypatch, script: str) -> list:
    import subprocess

    started: list = []

    def child():
        if P._CHILD and P._CHILD[0].poll() is None:
            return P._CHILD[0]
        proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        P._CHILD[:] = [proc]
        started.append(proc)
        return proc

    monkeypatch.setattr(P, "_child", child)
    return started


@pytest.fixture(autouse=True)
def _no_child_left():
    yield
    P._stop_child()


def test_run_child_reads_the_answer_and_keeps_the_child(monkeypatch) -> None:
    started = _fake_child(monkeypatch, (
        "import json, sys\n"
        "for line in sys.stdin:\n"
        "    req = json.loads(line)\n"
        "    print('a warning on stdout')\n"
        "    print(json.dumps({'results': {s: len(s) for s in req['ops']}}), flush=True)\n"))
    assert P._run_child(["ab", "abc"], 0, {}) == {"ab": 2, "abc": 3}
    assert P._run_child(["x"], 0, {}) == {"x": 1}
    assert len(started) == 1


def test_a_child_that_dies_is_started_once_more_then_given_up(monkeypatch) -> None:
    started = _fake_child(monkeypatch, "import sys; sys.stdin.readline(); sys.exit(3)")
    assert P._run_child(["a"], 0, {}) is None
    assert len(started) == 2


def test_a_child_that_hangs_is_stopped_after_the_timeout(monkeypatch) -> None:
    started = _fake_child(monkeypatch, "import time; time.sleep(60)")
    monkeypatch.setattr(P, "PROBE_TIMEOUT_S", 0.3)
    assert P._run_child(["a"], 0, {}) is None
    assert all(p.poll() is not None for p in started)


def test_probe_workspaces_caches_per_device_and_flags(monkeypatch) -> None:
    calls: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Fake GPU")
    monkeypatch.setattr(P, "_CACHE", {})

    def run(sigs, index, settings):
        calls.append(list(sigs))
        return {s: 7 for s in sigs if s != "bad"}

    monkeypatch.setattr(P, "_run_child", run)
    assert P.probe_workspaces(["a", "bad", "a"], "cuda") == {"a": 7, "bad": None}
    assert P.probe_workspaces(["a", "b"], "cuda:0") == {"a": 7, "b": 7}
    assert calls == [["a", "bad"], ["b"]]
    monkeypatch.setattr(P, "_run_child", lambda *a: None)
    assert P.probe_workspaces(["c"], "cuda") is None
    assert not any(key[1] == "c" for key in P._CACHE)


def test_no_probe_without_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert P.probe_workspaces(["a"], "cuda") is None
    assert P.probe_workspaces([], "cuda") == {}


# --- probed workspaces in an estimate -----------------------------------------------------------

class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


def _estimate_with(monkeypatch, found):
    """A CUDA estimate that takes the GPU path (fake tensors stay on the CPU here) with the
    probe answering ``found(signatures)``."""
    seen: list = []
    monkeypatch.setattr(M, "_probe_kernels", lambda dev: True)
    monkeypatch.setattr(M, "_fake_device", lambda dev: torch.device("cpu"))

    def probe(sigs, dev):
        seen.extend(sigs)
        return found(sigs)

    monkeypatch.setattr(M, "probe_workspaces", probe)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    est = M.estimate_step_memory(_Conv(), (x, torch.randn(4, 8, 16, 16)),
                                 lambda out, t: F.mse_loss(out, t), device="cuda")
    return est, seen


def test_probed_workspaces_raise_the_phase_where_the_kernel_ran(monkeypatch) -> None:
    big = 1 << 30
    none, _ = _estimate_with(monkeypatch, lambda sigs: {s: 0 for s in sigs})
    est, seen = _estimate_with(monkeypatch, lambda sigs: {
        s: big if "convolution_backward" in s else 0 for s in sigs})
    assert any("convolution_backward" in s for s in seen)
    assert est.phase_peaks["forward"] == none.phase_peaks["forward"]
    # the workspace comes on top of what was alive at a backward convolution
    alive = est.phase_peaks["backward"] - big
    assert est.baseline_bytes < alive <= none.phase_peaks["backward"]
    assert est.peak_phase == "backward" and est.peak_upper_bytes == est.peak_bytes
    assert "probed on the GPU" in est.kernel_workspaces
    assert "largest 1.00 GiB, convolution_backward" in est.kernel_workspaces
    assert "with the GPU's kernels" in est.device
    assert est.to_dict()["kernel_workspaces"] == est.kernel_workspaces
    assert est.kernel_workspaces in est.render()


def test_ops_the_probe_could_not_run_keep_the_bound(monkeypatch) -> None:
    est, _ = _estimate_with(monkeypatch, lambda sigs: {
        s: (None if "convolution" in s else 0) for s in sigs})
    assert est.peak_upper_bytes > est.peak_bytes        # cuDNN's bound: not probed
    failed, _ = _estimate_with(monkeypatch, lambda sigs: None)
    assert "not probed" in failed.kernel_workspaces
    assert failed.peak_upper_bytes > failed.peak_bytes
    assert failed.peak_bytes == est.peak_bytes


def test_without_a_gpu_a_cuda_estimate_does_not_probe(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not M._probe_kernels(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert M._probe_kernels(torch.device("cuda")) and M._probe_kernels(torch.device("cuda:0"))
    assert not M._probe_kernels(torch.device("cuda:1"))     # not on this machine
    assert not M._probe_kernels(torch.device("cpu"))
    monkeypatch.setenv("MODELCHECK_CUDA_PROBE", "0")
    assert not M._probe_kernels(torch.device("cuda"))


def test_a_batch_of_one_convolution_takes_the_larger_workspace_of_both_layouts(
        monkeypatch) -> None:
    # A fake tensor's batch-of-one stride may read as channels-last where the real one reads
    # as contiguous: both are probed, the larger workspace counts.
    x = torch.randn(1, 8, 6, 6).to(memory_format=torch.channels_last)
    w = torch.randn(8, 8, 3, 3)
    sig = P.op_signature(aten.convolution.default,
                         (x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1), {})
    (alt,) = P.layout_alternatives(sig)
    assert json.loads(alt)[1][0]["S"] == list(x.contiguous().stride())
    assert json.loads(alt)[1][1] == json.loads(sig)[1][1]
    assert P.layout_alternatives(alt) == []
    batch2 = P.op_signature(aten.convolution.default,
                            (torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last), w,
                             None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1), {})
    assert P.layout_alternatives(batch2) == []
    assert P.layout_alternatives(P.op_signature(aten.relu.default, (x,), {})) == []

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    monkeypatch.setattr(M, "_probe_kernels", lambda dev: True)
    monkeypatch.setattr(M, "_fake_device", lambda dev: torch.device("cpu"))
    asked: list = []

    def probe(sigs, dev):
        asked.extend(sigs)
        return {s: (5 << 20 if json.loads(s)[1][0]["S"] == [288, 36, 6, 1] else 1 << 20)
                for s in sigs}

    monkeypatch.setattr(M, "probe_workspaces", probe)
    est = M.estimate_step_memory(One(), x, phase="inference", device="cuda")
    assert len(asked) == 2
    assert "largest 5.00 MiB, convolution" in est.kernel_workspaces


def test_estimate_memory_carries_the_bound_and_the_probe_note(monkeypatch) -> None:
    def build():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3))

    batch = torch.empty(2, 3, 16, 16, device="meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    bounded = M.estimate_memory(build, batch, phase="inference", device="cuda")
    assert bounded.peak_upper_bytes > bounded.peak_bytes and not bounded.kernel_workspaces
    assert "up to" in bounded.render() and bounded.to_dict()["peak_upper_bytes"]
    monkeypatch.setattr(M, "_probe_kernels", lambda dev: True)
    monkeypatch.setattr(M, "_fake_device", lambda dev: torch.device("cpu"))
    monkeypatch.setattr(M, "probe_workspaces", lambda sigs, dev: {s: 4096 for s in sigs})
    probed = M.estimate_memory(build, batch, phase="inference", device="cuda")
    assert probed.peak_upper_bytes == probed.peak_bytes
    assert "largest 4.00 KiB" in probed.kernel_workspaces
    assert probed.kernel_workspaces in probed.render()
    cpu = M.estimate_memory(build, batch, phase="inference", device="cpu")
    assert cpu.peak_upper_bytes is None and cpu.kernel_workspaces == ""


def test_a_real_probe_process_rebuilds_and_runs_every_op_of_a_step(monkeypatch) -> None:
    # the child process for real, on the CPU (test seam): every op signature of a training
    # step of a conv net and of a transformer encoder is rebuilt there and runs
    monkeypatch.setenv(P.CPU_SEAM_ENV, "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Fake GPU")
    monkeypatch.setattr(P, "_CACHE", {})
    P._stop_child()
    _, conv_sigs = _estimate_with(monkeypatch, lambda sigs: {s: 0 for s in sigs})
    monkeypatch.setattr(M, "probe_workspaces", P.probe_workspaces)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    est = M.estimate_step_memory(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False),
                                 (torch.randn(2, 5, 16), torch.randn(2, 5, 16)),
                                 lambda o, t: F.mse_loss(o, t), device="cuda")
    assert "probed on the GPU" in est.kernel_workspaces
    found = P.probe_workspaces(list(conv_sigs), "cuda")
    assert found and all(v == 0 for v in found.values()), {
        json.loads(k)[0]: v for k, v in found.items() if v != 0}
    sdpa = [s for s in P._CACHE if json.loads(s[1])[0] == P.SDPA]
    assert sdpa and all(P._CACHE[s] == 0 for s in sdpa)
    assert not [s for s, v in P._CACHE.items() if v is None], "ops the child could not run"
