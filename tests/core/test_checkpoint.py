import argparse
import doctest
import gc
import json
import math
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch

from pytest_modelcheck.core import checkpoint as checkpoint_mod
from pytest_modelcheck.core.checkpoint import (
    CheckpointError,
    compare_checkpoints,
    inspect_checkpoint,
    load_state_dict,
)
from pytest_modelcheck.core.errors import UsageError

ST_CODES = {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64", torch.bfloat16: "BF16"}


def write_safetensors(path, tensors, metadata=None, header_override=None):
    """A minimal safetensors writer: u64 little-endian header length, JSON header, raw data."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": ST_CODES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    if header_override is not None:
        header = header_override
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)
    return path


def small_model():
    torch.manual_seed(0)
    # Linear(4, 3): 4*3 + 3 = 15; BatchNorm1d(3): 3 + 3 params, buffers 3 + 3 + 1; Linear(3, 2): 8
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))


def assert_one_line(exc_info, path):
    text = str(exc_info.value)
    assert "\n" not in text
    assert text.startswith(f"checkpoint {str(path)!r}: ")
    assert isinstance(exc_info.value, UsageError)


def test_raw_state_dict(tmp_path):
    path = tmp_path / "raw.pt"
    torch.save(small_model().state_dict(), path)
    info = inspect_checkpoint(path)
    assert info.format == "torch-zip" and info.state_key == ""
    # params 15 + 6 + 8 = 29; buffers 3 + 3 + 1 = 7 -> 36 elements
    assert info.total_numel == 36
    # 35 float32 elements * 4 + 1 int64 * 8 = 148 bytes
    assert info.total_bytes == 148
    assert info.dtypes == {"float32": 35, "int64": 1}
    assert info.by_prefix == {"0": {"tensors": 2, "numel": 15, "bytes": 60},
                              "1": {"tensors": 5, "numel": 13, "bytes": 56},
                              "2": {"tensors": 2, "numel": 8, "bytes": 32}}
    assert info.tensors["0.weight"] == [[3, 4], "float32"]
    assert not info.has_optimizer and info.metadata == {}
    assert info.matches_model is None


def test_wrapper_dict_with_config_epoch_optimizer(tmp_path):
    model = small_model()
    opt = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, 10)
    path = tmp_path / "wrap.pt"
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(),
                "scheduler": sched.state_dict(), "epoch": 12, "global_step": 3400,
                "best_metric": 0.875, "config": {"hidden": 3, "lr": 1e-3, "name": "mlp"},
                "ema": model.state_dict()}, path)
    info = inspect_checkpoint(path)
    assert info.state_key == "model_state_dict"
    assert info.metadata == {"epoch": 12, "global_step": 3400, "best_metric": 0.875}
    assert info.config == {"hidden": 3, "lr": 1e-3, "name": "mlp"}
    assert info.has_optimizer and info.has_scheduler
    assert info.other_state_dicts == ["ema"]
    assert info.total_numel == 36
    text = info.render()
    for part in ("'model_state_dict'", "epoch:", "12", "Optimizer state:     yes",
                 "Scheduler state:     yes", "hidden:", "Other weight sets:   ema"):
        assert part in text
    assert json.dumps(info.to_dict())


def test_wrapper_without_optimizer(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "step": 5}, path)
    info = inspect_checkpoint(path)
    assert info.state_key == "state_dict" and info.metadata == {"step": 5}
    assert not info.has_optimizer and not info.has_scheduler


def test_legacy_format(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"model": small_model().state_dict(), "epoch": 2}, path,
               _use_new_zipfile_serialization=False)
    info = inspect_checkpoint(path)
    assert info.format == "torch-legacy" and info.state_key == "model"
    assert info.total_numel == 36 and info.metadata == {"epoch": 2}


def test_model_key_mismatch_report(tmp_path):
    state = small_model().state_dict()
    state["extra.weight"] = torch.zeros(2)
    del state["2.bias"]
    state["0.weight"] = torch.zeros(5, 4)  # model has (3, 4)
    path = tmp_path / "mm.pt"
    torch.save(state, path)
    info = inspect_checkpoint(path, model=small_model)  # a zero-argument factory
    assert info.missing_keys == ["2.bias"]
    assert info.unexpected_keys == ["extra.weight"]
    assert info.shape_mismatches == [["0.weight", [5, 4], [3, 4]]]
    assert info.matches_model is False
    text = info.render()
    assert "missing in checkpoint: 2.bias" in text
    assert "shape mismatch: 0.weight: checkpoint (5, 4), model (3, 4)" in text


def test_model_match_with_dataparallel_prefix_and_meta_model(tmp_path):
    path = tmp_path / "dp.pt"
    torch.save({f"module.{k}": v for k, v in small_model().state_dict().items()}, path)
    with torch.device("meta"):
        model = small_model()
    info = inspect_checkpoint(path, model=model)
    assert info.matches_model is True and info.stripped_prefix == "module."


def test_bad_model_argument(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"w": torch.ones(1)}, path)
    with pytest.raises(UsageError, match=r"^model: expected an nn.Module or a zero-argument factory, got int$"):
        inspect_checkpoint(path, model=3)


def test_safetensors_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"enc.weight": torch.randn(3, 4, generator=g), "enc.bias": torch.randn(3, generator=g),
               "head.weight": torch.randn(2, 3, generator=g).half(),
               "steps": torch.tensor([7], dtype=torch.int64), "empty": torch.zeros(0, 3)}
    path = write_safetensors(tmp_path / "m.safetensors", tensors,
                             metadata={"format": "pt", "epoch": "4", "config": '{"depth": 2}'})
    info = inspect_checkpoint(path)
    assert info.format == "safetensors"
    # 12 + 3 + 6 + 1 + 0 = 22 elements; bytes 12*4 + 3*4 + 6*2 + 8 + 0 = 80
    assert info.total_numel == 22 and info.total_bytes == 80
    assert info.tensors["head.weight"] == [[2, 3], "float16"]
    assert info.metadata == {"format": "pt", "epoch": "4"} and info.config == {"depth": 2}
    assert info.by_prefix["enc"] == {"tensors": 2, "numel": 15, "bytes": 60}
    loaded = load_state_dict(path)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)


def test_safetensors_unaligned_data_and_values_outlive_the_file(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
              "b": {"dtype": "I64", "shape": [1], "data_offsets": [16, 24]}}
    raw = json.dumps(header).encode() + b"   "  # header length not a multiple of 8
    data = torch.arange(4.0).numpy().tobytes() + torch.tensor([5]).numpy().tobytes()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    loaded = load_state_dict(path)
    gc.collect()
    assert torch.equal(loaded["w"], torch.arange(4.0).reshape(2, 2))
    assert loaded["b"].tolist() == [5]


def test_safetensors_bf16_and_key_check(tmp_path):
    model = torch.nn.Linear(2, 2)
    tensors = {"weight": model.weight.detach().bfloat16()}
    path = write_safetensors(tmp_path / "b.safetensors", tensors)
    info = inspect_checkpoint(path, model=model)
    assert info.missing_keys == ["bias"] and info.dtypes == {"bfloat16": 4}
    assert torch.equal(load_state_dict(path)["weight"], tensors["weight"])


def test_safetensors_declaring_a_terabyte_is_refused_without_allocation(tmp_path):
    header = {"huge": {"dtype": "F32", "shape": [2 ** 38], "data_offsets": [0, 2 ** 40]}}
    path = write_safetensors(tmp_path / "huge.safetensors", {}, header_override=header)
    with pytest.raises(CheckpointError) as exc:
        inspect_checkpoint(path)
    assert_one_line(exc, path)
    assert "'huge' declares 1.00 TiB" in str(exc.value)


def test_safetensors_header_length_beyond_file(tmp_path):
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", 2 ** 60) + b"{}")
    with pytest.raises(CheckpointError, match="header declares") as exc:
        inspect_checkpoint(path)
    assert_one_line(exc, path)


def test_safetensors_offsets_inconsistent_with_shape(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}
    path = tmp_path / "o.safetensors"
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
    with pytest.raises(CheckpointError, match="needs 16 bytes, data_offsets span 8") as exc:
        inspect_checkpoint(path)
    assert_one_line(exc, path)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvalPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("how", ["zip", "legacy", "plain-pickle", "eval"])
def test_hostile_pickle_never_runs(tmp_path, how):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    if how == "zip":
        torch.save({"model": {"w": torch.ones(1)}, "x": Payload(marker)}, path)
    elif how == "legacy":
        torch.save({"x": Payload(marker)}, path, _use_new_zipfile_serialization=False)
    elif how == "plain-pickle":
        path.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    else:
        torch.save({"x": EvalPayload(marker)}, path)
    for action in (inspect_checkpoint, load_state_dict, lambda p: compare_checkpoints(p, p)):
        with pytest.raises(CheckpointError) as exc:
            action(path)
        assert_one_line(exc, path)
        assert "untrusted" in str(exc.value) and "allow_unsafe=True" in str(exc.value)
    assert not marker.exists()


def test_allow_unsafe_loads_a_trusted_pickled_object(tmp_path):
    path = tmp_path / "obj.pt"
    # argparse.Namespace (a common way to store the run's arguments) is not on torch's allowlist
    torch.save({"state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError, match=r"untrusted .* \(it references argparse.Namespace\)"):
        inspect_checkpoint(path)
    info = inspect_checkpoint(path, allow_unsafe=True)
    assert info.total_numel == 2 and info.config == {"lr": 0.1}


@pytest.mark.parametrize("saved, key", [
    (lambda m: m, "<a pickled Sequential module>"),                    # torch.save(model)
    (lambda m: {"model": m, "epoch": 4}, "model (a pickled Sequential module)"),
])
def test_a_whole_pickled_module_is_read_through_its_state_dict(tmp_path, saved, key):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    path = tmp_path / "full.pt"
    torch.save(saved(model), path)
    info = inspect_checkpoint(path, model=model, allow_unsafe=True)
    assert info.state_key == key
    assert set(info.tensors) == set(model.state_dict()) and info.total_numel == 28
    assert info.matches_model, info.render()
    assert "Weights:             'model (a pickled" in info.render() or key.startswith("<")
    other = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5))
    assert not inspect_checkpoint(path, model=other, allow_unsafe=True).matches_model


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.pt"
    torch.save({"model_state_dict": {"w": torch.arange(300.0)}, "epoch": 1}, path)
    return path


@pytest.mark.parametrize("cut", ["10 bytes", "100 bytes", "half", "all but 10"])
def test_truncated(good_file, cut):
    data = good_file.read_bytes()
    n = {"10 bytes": 10, "100 bytes": 100, "half": len(data) // 2, "all but 10": len(data) - 10}[cut]
    good_file.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as exc:
        inspect_checkpoint(good_file)
    assert_one_line(exc, good_file)


def _member_data_offset(path, member):
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def test_bit_flip_in_pickle_is_caught(good_file):
    start, size = _member_data_offset(good_file, "good/data.pkl")
    data = bytearray(good_file.read_bytes())
    data[start + size // 2] ^= 0x04
    good_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt") as exc:
        inspect_checkpoint(good_file)
    assert_one_line(exc, good_file)


def test_bit_flip_in_tensor_data_is_caught_with_verify(good_file):
    start, size = _member_data_offset(good_file, "good/data/0")
    data = bytearray(good_file.read_bytes())
    data[start + 17] ^= 0x01
    good_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt") as exc:
        inspect_checkpoint(good_file, verify=True)
    assert_one_line(exc, good_file)


def test_empty_directory_missing_wrong_magic(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)$") as exc:
        inspect_checkpoint(empty)
    assert_one_line(exc, empty)
    with pytest.raises(CheckpointError, match="is a directory") as exc:
        inspect_checkpoint(tmp_path)
    assert_one_line(exc, tmp_path)
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="no such file$") as exc:
        inspect_checkpoint(missing)
    assert_one_line(exc, missing)
    wrong = tmp_path / "notes.pt"
    wrong.write_bytes(b"hello, this is text\n" * 4)
    with pytest.raises(CheckpointError, match="not a PyTorch") as exc:
        inspect_checkpoint(wrong)
    assert_one_line(exc, wrong)


def test_file_without_state_dict(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "notes": "x"}, path)
    info = inspect_checkpoint(path)
    assert info.state_key is None and info.total_numel == 0 and info.metadata["epoch"] == 3
    with pytest.raises(CheckpointError, match="holds no state dict") as exc:
        load_state_dict(path)
    assert_one_line(exc, path)


def test_compare_ranking_and_frozen_detection(tmp_path):
    a = {"enc.weight": torch.tensor([3.0, 4.0]),   # ||a|| = 5
         "enc.bias": torch.tensor([1.0, 0.0]),
         "head.weight": torch.tensor([1.0, 1.0, 1.0, 1.0]),  # ||a|| = 2
         "frozen.weight": torch.tensor([2.0, -2.0]),
         "gone": torch.ones(1), "resized": torch.ones(3), "cast": torch.ones(2)}
    b = {"enc.weight": torch.tensor([3.0, 5.0]),   # ||b-a|| = 1 -> 1/5 = 0.2
         "enc.bias": torch.tensor([0.0, 1.0]),     # ||b-a|| = sqrt 2 -> 1.414, cosine 0
         "head.weight": torch.tensor([2.0, 2.0, 2.0, 2.0]),  # ||b-a|| = 2 -> 1.0, cosine 1
         "frozen.weight": torch.tensor([2.0, -2.0]),
         "new": torch.ones(1), "resized": torch.ones(4), "cast": torch.ones(2, dtype=torch.float64)}
    pa, pb = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"model_state_dict": a, "epoch": 1}, pa)
    torch.save({"model_state_dict": b, "epoch": 2}, pb)
    report = compare_checkpoints(pa, pb)
    names = [t.name for t in report.tensors]
    assert names[:3] == ["enc.bias", "head.weight", "enc.weight"]
    by_name = {t.name: t for t in report.tensors}
    assert by_name["enc.bias"].relative_change == pytest.approx(math.sqrt(2))
    assert by_name["enc.bias"].cosine == pytest.approx(0.0)
    assert by_name["head.weight"].relative_change == pytest.approx(1.0)
    assert by_name["head.weight"].cosine == pytest.approx(1.0)
    assert by_name["head.weight"].max_abs_diff == 1.0
    assert by_name["enc.weight"].relative_change == pytest.approx(0.2)
    # cosine of (3,4) and (3,5): (9+20) / (5*sqrt(34))
    assert by_name["enc.weight"].cosine == pytest.approx(29 / (5 * math.sqrt(34)))
    assert report.unchanged == ["frozen.weight", "cast"]
    assert report.only_in_a == ["gone"] and report.only_in_b == ["new"]
    assert report.shape_mismatches == [["resized", [3], [4]]]
    assert report.dtype_mismatches == [["cast", "float32", "float64"]]
    # layers: enc: sqrt((1 + 2) / (25 + 1)) = 0.3397; head: 1.0; frozen: 0
    layers = dict(report.layers)
    assert layers["enc"] == pytest.approx(math.sqrt(3 / 26))
    assert [lay[0] for lay in report.layers][:2] == ["head", "enc"]
    text = report.render()
    assert "Unchanged (frozen or dead): frozen.weight, cast" in text
    assert "Only in a: gone" in text and "Shape differs: resized: (3,) vs (4,)" in text
    d = report.to_dict()
    assert json.dumps(d) and d["tensors"][0]["name"] == "enc.bias"


def test_compare_modules_and_a_training_step():
    torch.manual_seed(0)
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    report = compare_checkpoints(before, model)
    assert {"0.weight", "0.bias"} <= set(report.unchanged)
    assert "2.weight" not in report.unchanged
    assert report.tensors[0].relative_change > 0


def test_compare_chunked_matches_numpy(monkeypatch):
    monkeypatch.setattr(checkpoint_mod, "_CHUNK", 7)  # many chunks
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    t = compare_checkpoints({"w": a}, {"w": b}).tensors[0]
    na, nb = a.double().numpy(), b.double().numpy()
    assert t.relative_change == pytest.approx(np.linalg.norm(nb - na) / np.linalg.norm(na))
    assert t.cosine == pytest.approx(na @ nb / (np.linalg.norm(na) * np.linalg.norm(nb)))
    assert t.max_abs_diff == pytest.approx(np.abs(nb - na).max())


def test_compare_complex_tensors():
    a = torch.tensor([1 + 1j, 0j], dtype=torch.complex64)
    t = compare_checkpoints({"s": a}, {"s": a * 2}).tensors[0]
    assert t.relative_change == pytest.approx(1.0) and t.cosine == pytest.approx(1.0)


def test_compare_bad_argument():
    with pytest.raises(UsageError, match=r"^compare_checkpoints: expected a path, a state dict or an nn.Module, got int$"):
        compare_checkpoints(1, {"w": torch.ones(1)})


def test_compare_safetensors_with_torch_file(tmp_path):
    a = {"w": torch.ones(4)}
    write_safetensors(tmp_path / "a.safetensors", a)
    torch.save({"w": torch.ones(4) * 3}, tmp_path / "b.pt")
    report = compare_checkpoints(tmp_path / "a.safetensors", tmp_path / "b.pt")
    assert report.tensors[0].relative_change == pytest.approx(2.0)  # ||2*1|| / ||1||


def test_doctests(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the examples' mkdtemp()
    result = doctest.testmod(checkpoint_mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 10


def test_compare_measures_zero_norm_tensors_absolutely_and_counters_apart():
    a = {"fc.weight": torch.tensor([3.0, 4.0]),          # ||a|| = 5
         "fc.bias": torch.zeros(2),                      # zero-initialised: no scale
         "bn.running_mean": torch.zeros(3),
         "bn.num_batches_tracked": torch.tensor(0),
         "mask": torch.tensor([True, False, True])}
    b = {"fc.weight": torch.tensor([3.0, 5.0]),          # 1/5 = 0.2 relative
         "fc.bias": torch.tensor([3.0, 4.0]),            # ||b-a|| = 5 absolute
         "bn.running_mean": torch.tensor([0.1, 0.0, 0.0]),
         "bn.num_batches_tracked": torch.tensor(10),
         "mask": torch.tensor([True, True, True])}
    report = compare_checkpoints(a, b)
    by_name = {t.name: t for t in report.tensors}
    assert set(by_name) == {"fc.weight", "fc.bias", "bn.running_mean"}
    assert by_name["fc.bias"].relative_change is None and by_name["fc.bias"].measure == "absolute"
    assert by_name["fc.bias"].change == pytest.approx(5.0)
    assert by_name["fc.weight"].measure == "relative" and by_name["fc.weight"].change == pytest.approx(0.2)
    # relative movers are ranked first, then the tensors that started at zero
    assert [t.name for t in report.tensors] == ["fc.weight", "fc.bias", "bn.running_mean"]
    assert [c["name"] for c in report.counters] == ["bn.num_batches_tracked", "mask"]
    counter = report.counters[0]
    assert (counter["a"], counter["b"], counter["changed"]) == (0, 10, 1)
    assert report.counters[1]["changed"] == 1 and report.counters[1]["a"] is None
    assert dict(report.layers) == {"fc": pytest.approx(math.sqrt(26 / 25))}
    assert report.layers_from_zero == [["bn", pytest.approx(0.1)]]
    text = report.render()
    assert "inf" not in text.lower() and "bn.num_batches_tracked: 0 -> 10" in text
    assert "mask: 1 of 3 elements changed" in text
    assert "inf" not in json.dumps(report.to_dict()).lower()
    # the gate: relative change, absolute where the old norm is zero, counters never
    assert [t.name for t in report.drift_over(0.15)] == ["fc.weight", "fc.bias"]
    assert [t.name for t in report.drift_over(1.0)] == ["fc.bias"]
    assert report.drift_over(10.0) == [] and report.matches


def test_compare_a_trusted_full_model_pickle_with_allow_unsafe(tmp_path):
    model = small_model()
    path = tmp_path / "full.pt"
    torch.save(model, path)
    with pytest.raises(CheckpointError, match="allow_unsafe=True"):
        compare_checkpoints(path, model)
    report = compare_checkpoints(path, model, allow_unsafe=True)
    assert report.matches and report.counters[0]["name"] == "1.num_batches_tracked"
    assert set(report.unchanged) == set(model.state_dict()) - {"1.num_batches_tracked"}
