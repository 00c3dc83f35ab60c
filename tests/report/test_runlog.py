"""Per-step CSV and TensorBoard event logs, read back by an independent reader."""
import csv
import math
import os
import struct

import pytest
import torch
from torch import nn

from pytest_modelcheck.checks.dynamics import grad_norms_stable, loss_components, lr_schedule
from pytest_modelcheck.checks.overfit import model_overfits
from pytest_modelcheck.report.runlog import (EventFileError, crc32c, masked_crc32c,
                                            read_event_file, run_dirname, write_run_logs)


# -- an independent reader: framing, CRCs and protobuf fields, written from the format spec -----
def _crc32c_bitwise(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _mask(crc):
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(buf, i):
    v = s = 0
    while True:
        b = buf[i]
        i += 1
        v |= (b & 0x7F) << s
        s += 7
        if b < 0x80:
            return v, i


def _message(buf):
    i, out = 0, []
    while i < len(buf):
        key, i = _varint(buf, i)
        f, w = key >> 3, key & 7
        if w == 0:
            v, i = _varint(buf, i)
        elif w == 1:
            v, i = struct.unpack("<d", buf[i:i + 8])[0], i + 8
        elif w == 5:
            v, i = struct.unpack("<f", buf[i:i + 4])[0], i + 4
        else:
            n, i = _varint(buf, i)
            v, i = buf[i:i + n], i + n
        out.append((f, w, v))
    return out


def _read(path):
    raw = path.read_bytes()
    events, i = [], 0
    while i < len(raw):
        (n,) = struct.unpack("<Q", raw[i:i + 8])
        assert struct.unpack("<I", raw[i + 8:i + 12])[0] == _mask(_crc32c_bitwise(raw[i:i + 8]))
        data = raw[i + 12:i + 12 + n]
        assert struct.unpack("<I", raw[i + 12 + n:i + 16 + n])[0] == _mask(_crc32c_bitwise(data))
        i += 16 + n
        ev = {"scalars": {}}
        for f, w, v in _message(data):
            if (f, w) == (1, 1):
                ev["wall_time"] = v
            elif (f, w) == (2, 0):
                ev["step"] = v
            elif (f, w) == (3, 2):
                ev["file_version"] = v.decode()
            elif (f, w) == (5, 2):
                for vf, _, value in _message(v):
                    assert vf == 1
                    fields = dict(((a, b), c) for a, b, c in _message(value))
                    ev["scalars"][fields[(1, 2)].decode()] = fields[(2, 5)]
        events.append(ev)
    return events


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def _batch(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


# ---------------------------------------------------------------------------------------------
def test_crc32c_known_values():
    assert crc32c(b"123456789") == 0xE3069283           # the CRC-32C check value
    assert crc32c(b"\x00" * 32) == 0x8A9136AA           # RFC 3720 B.4: 32 bytes of zeros
    assert crc32c(b"\xff" * 32) == 0x62A8AB43           # RFC 3720 B.4: 32 bytes of 0xff
    data = bytes(range(256)) * 3
    assert crc32c(data) == _crc32c_bitwise(data)
    assert masked_crc32c(data) == _mask(_crc32c_bitwise(data))


def test_real_check_results_round_trip(tmp_path):
    fit = model_overfits(steps=10, lr=1e-2, model=_model(), batch=_batch())
    grads = grad_norms_stable(steps=6, model=_model(), batch=_batch())
    assert fit.passed is not None and grads.passed is True
    nodeid = "tests/test_m.py::test_train[cpu-1]"
    paths = write_run_logs(str(tmp_path), nodeid, [fit, grads], wall_time=1700000000.5)
    rundir = tmp_path / "tests_test_m.py__test_train_cpu-1_"
    names = sorted(p.name for p in rundir.iterdir() if p.name != ".nodeid")
    assert (rundir / ".nodeid").read_text() == nodeid  # which test owns the folder
    assert names[1:] == ["grad_norms_stable.csv", "model_overfits.csv"]
    assert names[0].startswith("events.out.tfevents.1700000000.")   # tensorboard's file pattern
    assert names[0].endswith(".modelcheck") and paths[-1] == str(rundir / names[0])

    rows = _csv(rundir / "grad_norms_stable.csv")
    assert rows[0] == ["step", "grad_norms", "losses"]
    assert len(rows) == 1 + 6
    assert [float(r[1]) for r in rows[1:]] == pytest.approx(grads.metrics["grad_norms"])
    rows = _csv(rundir / "model_overfits.csv")
    assert rows[0][:2] == ["step", "losses"]
    assert [float(r[1]) for r in rows[1:]] == pytest.approx(fit.metrics["losses"])

    events = _read(rundir / names[0])
    assert events[0]["file_version"] == "brain.Event:2"
    assert events[0]["wall_time"] == 1700000000.5
    assert [e["step"] for e in events[1:]] == list(range(len(events) - 1))
    losses = [e["scalars"]["model_overfits/losses"] for e in events[1:]
              if "model_overfits/losses" in e["scalars"]]
    assert losses == pytest.approx(fit.metrics["losses"], rel=1e-6)   # float32 on disk
    norms = [e["scalars"]["grad_norms_stable/grad_norms"] for e in events[1:7]]
    assert norms == pytest.approx(grads.metrics["grad_norms"], rel=1e-6)
    assert read_event_file(str(rundir / names[0]))[1]["scalars"] == pytest.approx(
        events[1]["scalars"])


def test_terms_lr_and_non_finite_values(tmp_path):
    class TwoTerms(nn.Module):
        def forward(self, output, target):
            return {"mse": ((output - target) ** 2).mean(), "l1": (output - target).abs().mean()}

    comps = loss_components(steps=4, model=_model(), batch=_batch(), loss=TwoTerms())
    lr = lr_schedule(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5),
                     lambda t: 1e-2 * 0.5 ** (t // 2), steps=4, model=_model(), batch=_batch())
    assert comps.passed is True and lr.passed is True, (comps.headline, lr.headline)
    diverged = {"check": "model_overfits", "passed": False,
                "metrics": {"losses": [1.0, 3.0, "inf", "nan"], "goal": 0.1}}
    skipped = {"check": "throughput_at_least", "metrics": {"times_s": [0.1, 0.2]}}
    write_run_logs(str(tmp_path), "t.py::test_x", [comps.to_dict(), lr, diverged, skipped],
                   wall_time=0.0)
    rundir = tmp_path / "t.py__test_x"
    assert sorted(p.suffix for p in rundir.iterdir() if p.name != ".nodeid") == \
        [".csv"] * 3 + [".modelcheck"]
    assert _csv(rundir / "loss_components.csv")[0] == ["step", "terms/mse", "terms/l1"]
    rows = _csv(rundir / "lr_schedule.csv")
    assert rows[0] == ["step", "lrs", "expected_lrs", "losses"]
    # StepLR(step_size=2, gamma=0.5) from the default lr 1e-2: 1e-2, 1e-2, 5e-3, 5e-3
    assert [float(r[1]) for r in rows[1:]] == pytest.approx([1e-2, 1e-2, 5e-3, 5e-3])
    assert [r[1] for r in _csv(rundir / "model_overfits.csv")[1:]] == ["1.0", "3.0", "inf", "nan"]
    (event_file,) = rundir.glob("events.out.tfevents.*")
    events = _read(event_file)
    assert math.isinf(events[3]["scalars"]["model_overfits/losses"])
    assert math.isnan(events[4]["scalars"]["model_overfits/losses"])
    assert "loss_components/terms/l1" in events[1]["scalars"]
    assert not any(k.startswith("throughput") for e in events for k in e["scalars"])


def test_rewrite_replaces_the_event_file_and_nothing_without_series(tmp_path):
    res = [{"check": "grad_norms_stable", "metrics": {"grad_norms": [1.0, 2.0]}}]
    write_run_logs(str(tmp_path), "t.py::test_a", res, wall_time=1.0)
    write_run_logs(str(tmp_path), "t.py::test_a", res, wall_time=2.0)
    assert len(list((tmp_path / "t.py__test_a").glob("events.out.tfevents.*"))) == 1
    assert write_run_logs(str(tmp_path), "t.py::test_b", [{"check": "grads_finite",
                                                          "metrics": {"n": 3}}]) == []
    assert not (tmp_path / "t.py__test_b").exists()


def test_ids_that_read_alike_get_folders_of_their_own(tmp_path):
    res = [{"check": "grad_norms_stable", "metrics": {"grad_norms": [1.0, 2.0]}}]
    first = write_run_logs(str(tmp_path), "t.py::test_odd[a/b]", res, wall_time=1.0)
    second = write_run_logs(str(tmp_path), "t.py::test_odd[a_b]", res, wall_time=1.0)
    assert os.path.dirname(first[0]) != os.path.dirname(second[0])
    again = write_run_logs(str(tmp_path), "t.py::test_odd[a/b]", res, wall_time=2.0)
    assert os.path.dirname(again[0]) == os.path.dirname(first[0])


def test_long_ids_stay_distinct():
    a, b = run_dirname("t.py::test_" + "x" * 300 + "[1]"), run_dirname("t.py::test_" + "x" * 300 + "[2]")
    assert a != b and len(a) == len(b) == 120


def test_corrupt_file_is_reported(tmp_path):
    (path,) = [p for p in write_run_logs(str(tmp_path), "t.py::test_a", [
        {"check": "grad_norms_stable", "metrics": {"grad_norms": [1.0, 2.0]}}]) if "tfevents" in p]
    with open(path, "rb") as fh:
        raw = bytearray(fh.read())
    raw[-6] ^= 0xFF   # inside the last record's data
    with open(path, "wb") as fh:
        fh.write(bytes(raw))
    with pytest.raises(EventFileError, match="data CRC mismatch"):
        read_event_file(path)
