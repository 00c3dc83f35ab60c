"""profile_model: deterministic timing with a fake clock, OOM handling, JSON, recommendations."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch import nn

from pytest_modelcheck.core.errors import UsageError
from pytest_modelcheck.core.profiler import (
    ProfileReport,
    is_out_of_memory,
    profile_model,
    recommend,
)
from pytest_modelcheck.core.state import fingerprints_equal, model_fingerprint


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def make_batch(n):
    return torch.ones(n, 16)


def clock(step=0.25):
    """A fake clock that reads ``step`` seconds later on every call: each run takes ``step``."""
    return itertools.count(0.0, step).__next__


def test_rows_with_a_fake_clock():
    model = tiny()
    before = model_fingerprint(model)
    r = profile_model(model, make_batch, batch_sizes=[1, 2, 4], warmup=2, runs=5,
                      timer=clock())
    assert fingerprints_equal(before, model_fingerprint(model)) == []
    rows = r.batch_profiling
    assert [row["batch_size"] for row in rows] == [1, 2, 4]
    # every run reads 0.25 s: latency 250 ms, throughput batch / 0.25 s
    assert rows[0]["latency_ms"] == {"mean": 250.0, "std": 0.0, "median": 250.0,
                                     "min": 250.0, "max": 250.0, "p90": 250.0}
    assert [row["throughput"] for row in rows] == [4.0, 8.0, 16.0]
    assert all(row["runs"] == 5 for row in rows)
    # forward FLOPs: 2*B*(16*32 + 32*4) = 2*B*640 = 1280*B
    assert [row["flops"] for row in rows] == [1280, 2560, 5120]
    assert rows[2]["achieved_flops_per_s"] == 5120 / 0.25
    assert r.architecture["total_parameters"] == 16 * 32 + 32 + 32 * 4 + 4  # 676
    assert r.architecture["flops"] == 1280
    # CPU memory is measured: the peak holds the weights (676 floats = 2704 bytes) at least
    assert rows[0]["memory_estimated"] is False
    assert rows[0]["peak_memory_bytes"] >= 2704
    assert rows[2]["activation_bytes"] > rows[0]["activation_bytes"] > 0
    assert r.single_input["batch_size"] == 1 and r.single_input["input_shape"] == [[1, 16]]
    assert r.stopped is None


def test_json_structure():
    r = profile_model(tiny(), make_batch, batch_sizes=[1, 2], warmup=0, runs=2,
                      timer=clock(), memory_budget="1 MiB")
    data = json.loads(r.to_json())
    assert set(data) == {"config", "architecture", "single_input", "batch_profiling",
                         "recommendations", "stopped"}
    assert data["config"]["device"] == "cpu" and data["config"]["batch_sizes"] == [1, 2]
    assert {"total_parameters", "trainable_parameters", "model_size_bytes",
            "flops"} <= set(data["architecture"])
    assert set(data["single_input"]["latency_ms"]) == {"mean", "std", "median", "min", "max",
                                                       "p90"}
    row = data["batch_profiling"][1]
    assert {"batch_size", "latency_ms", "throughput", "peak_memory_bytes", "activation_bytes",
            "memory_method", "memory_estimated", "flops", "achieved_flops_per_s",
            "train_peak_bytes"} <= set(row)
    assert row["train_peak_bytes"] > row["peak_memory_bytes"] - 1
    assert [rec["kind"] for rec in data["recommendations"]] == ["largest_fitting",
                                                               "throughput_knee"]
    assert "samples/s" in r.render().splitlines()[0]


class OomAtEight(nn.Module):
    """Raises CUDA's out-of-memory error for batches of 8 or more."""

    def __init__(self, error):
        super().__init__()
        self.lin = nn.Linear(16, 4)
        self.error = error

    def forward(self, x):
        if x.shape[0] >= 8:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.lin(x)


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError, RuntimeError])
def test_out_of_memory_stops_the_sweep(error):
    calls = []
    r = profile_model(OomAtEight(error), make_batch, batch_sizes=[1, 2, 4, 8, 16], warmup=0,
                      runs=2, timer=clock(), progress=lambda *a: calls.append(a))
    assert [row["batch_size"] for row in r.batch_profiling] == [1, 2, 4]
    assert r.stopped["batch_size"] == 8 and r.stopped["last_fitting_batch_size"] == 4
    assert r.stopped["reason"].startswith("out of memory at batch size 8 (")
    assert "CUDA out of memory" in r.stopped["reason"]
    assert calls[-1] == (4, 5, "stopped: out of memory at batch size 8")
    assert "stopped at batch 8" in r.render()


def test_other_errors_propagate():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 4)

        def forward(self, x):
            raise ValueError("shape mismatch")

    with pytest.raises(Exception, match="shape mismatch"):
        profile_model(Broken(), make_batch, batch_sizes=[1], warmup=0, runs=1, timer=clock())


def test_progress_callable_and_stderr(capsys):
    calls = []
    profile_model(tiny(), make_batch, batch_sizes=[1, 2], warmup=0, runs=1, timer=clock(),
                  progress=lambda done, total, msg: calls.append((done, total)))
    assert calls == [(0, 2), (1, 2), (1, 2), (2, 2)]
    profile_model(tiny(), make_batch, batch_sizes=[1], warmup=0, runs=1, timer=clock(),
                  progress=True)
    assert "[1/1] batch size 1" in capsys.readouterr().err


def rows(*table):
    return [{"batch_size": b, "throughput": t, "train_peak_bytes": m} for b, t, m in table]


def test_recommendations_on_hand_made_numbers():
    table = rows((1, 100.0, 1000), (2, 190.0, 1800), (4, 300.0, 3400), (8, 330.0, 6600),
                 (16, 340.0, 13000))
    recs = {r["kind"]: r for r in recommend(table, memory_budget=10000)}
    # 80% of 10000 = 8000: batch 8 (6600) fits, batch 16 (13000) does not
    assert recs["largest_fitting"]["batch_size"] == 8
    assert "80% of the" in recs["largest_fitting"]["reason"]
    # best 340; 90% is 306: batch 8 (330) is the smallest reaching it, batch 4 (300) is not
    assert recs["throughput_knee"]["batch_size"] == 8
    assert "90% of the best throughput" in recs["throughput_knee"]["reason"]
    # a budget of 1000: 80% = 800 < 1000 needed by batch 1
    assert recommend(table, memory_budget=1000)[0]["batch_size"] is None
    assert [r["kind"] for r in recommend(table)] == ["throughput_knee"]


def test_is_out_of_memory():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("x"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: out of memory"))
    assert not is_out_of_memory(RuntimeError("size mismatch"))


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_sizes": []}, r"^batch_sizes=\[\]: expected a non-empty list of positive integers$"),
    ({"batch_sizes": [0]}, r"^batch_sizes=\[0\]: expected"),
    ({"runs": 0}, r"^runs=0: expected an integer >= 1$"),
    ({"progress": "yes"}, r"^progress='yes': expected a callable"),
    ({"memory_budget": "lots"}, r"memory_budget|lots"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(UsageError, match=match):
        profile_model(tiny(), make_batch, **{"warmup": 0, "runs": 1, "timer": clock(),
                                             **kwargs})


def test_report_round_trips_builtin_types():
    r = ProfileReport(config={"device": "cpu"})
    assert json.loads(r.to_json())["batch_profiling"] == []


def test_meta_model_is_refused():
    with torch.device("meta"):
        model = nn.Linear(16, 4)
    with pytest.raises(UsageError, match="^model: it is on the meta device"):
        profile_model(model, make_batch, batch_sizes=[1], warmup=0, runs=1, timer=clock())
