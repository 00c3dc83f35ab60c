"""Hostile and damaged checkpoint files: a one-line ``CheckpointError`` or a result, nothing else.

Hypothesis derives damaged files from a valid small zip ``.pt``, a legacy ``.pt`` and a
``.safetensors`` file (truncations, bit flips, inserted and removed bytes); hand-made cases add
rewritten zip central directories, wrong magic, an empty file, a directory and safetensors
headers that lie (offsets and sizes beyond the file, a 1 TiB tensor, negative numbers,
non-JSON, deeply nested JSON, values of the wrong type). ``inspect_checkpoint`` and
``compare_checkpoints`` run on every case in a child process, so that a native crash fails the
test instead of killing pytest, and the child's peak resident memory (``ru_maxrss`` from
``os.wait4``) must stay under 1 GiB although headers declare terabytes. A zoo of hostile
pickles (os.system, eval, exec, subprocess.Popen, builtins.__import__, nested inside an
object, legacy format, plain pickle) never runs its payload and is refused as needing an
untrusted load.
"""
import builtins
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_modelcheck.core.checkpoint import CheckpointError, compare_checkpoints, inspect_checkpoint

# Growth of the worker's peak RSS over a process that only imports the same modules (torch's
# own footprint differs between CPU and CUDA builds): the fuzzed files may cost this much.
MAX_RSS_GROWTH_KIB = 512 * 1024  # 512 MiB


def _safetensors_bytes(header, data=b""):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw)) + raw + data


def _valid_files(tmp_path):
    torch.manual_seed(0)
    state = {"enc.weight": torch.randn(4, 3), "enc.bias": torch.randn(4), "steps": torch.tensor(7)}
    zip_pt, legacy_pt, st_file = tmp_path / "good.pt", tmp_path / "legacy.pt", tmp_path / "good.safetensors"
    torch.save({"model_state_dict": state, "epoch": 3}, zip_pt)
    torch.save(state, legacy_pt, _use_new_zipfile_serialization=False)
    header, data = {}, b""
    for name, t in state.items():
        blob = t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": {torch.float32: "F32", torch.int64: "I64"}[t.dtype],
                        "shape": list(t.shape), "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    header["__metadata__"] = {"format": "pt"}
    st_file.write_bytes(_safetensors_bytes(header, data))
    return {".pt": zip_pt, ".legacy.pt": legacy_pt, ".safetensors": st_file}


# --------------------------------------------------------------------------- damage

def _mutate(data, mutation):
    kind, a, b = mutation
    if not data:
        return data
    pos = a % len(data)
    if kind == "truncate":
        return data[:pos]
    if kind == "flip":
        out = bytearray(data)
        for i, bit in enumerate(b):
            out[(pos + i * 7919) % len(out)] ^= 1 << bit
        return bytes(out)
    if kind == "insert":
        return data[:pos] + b + data[pos:]
    return data[:pos] + data[pos + 1 + len(b):]  # remove


mutations = st.tuples(
    st.sampled_from(["truncate", "flip", "insert", "remove"]),
    st.integers(min_value=0, max_value=10**6),
    st.one_of(st.lists(st.integers(0, 7), min_size=1, max_size=6), st.binary(min_size=1, max_size=24)),
).map(lambda m: (m[0], m[1], m[2] if (m[0] == "flip") == isinstance(m[2], list) else
                 (list(m[2]) and [x % 8 for x in m[2]]) if m[0] == "flip" else bytes(m[2])))


def _fuzzed_cases(valid, out_dir):
    cases = []

    @settings(max_examples=60, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(sorted(valid)), mutations)
    def collect(suffix, mutation):
        data = _mutate(valid[suffix].read_bytes(), mutation)
        path = out_dir / f"fuzz{len(cases):03d}{suffix}"
        path.write_bytes(data)
        cases.append((str(path), str(valid[suffix]), f"{mutation[0]} {suffix}"))

    collect()
    return cases


def _central_directory_cases(zip_pt, out_dir):
    data = zip_pt.read_bytes()
    eocd = data.rindex(b"PK\x05\x06")
    cd_offset = struct.unpack("<I", data[eocd + 16:eocd + 20])[0]
    variants = {
        # the central directory said to start beyond the end of the file
        "cd_offset_beyond": data[:eocd + 16] + struct.pack("<I", len(data) + 10**6) + data[eocd + 20:],
        # the central directory said to start inside the first record's data
        "cd_offset_inside": data[:eocd + 16] + struct.pack("<I", 40) + data[eocd + 20:],
        # 65535 entries declared
        "cd_count_huge": data[:eocd + 8] + struct.pack("<HH", 0xFFFF, 0xFFFF) + data[eocd + 12:],
        # every central directory entry declares 4 GiB - 1 compressed and uncompressed
        "cd_sizes_huge": _cd_sizes(data, cd_offset, eocd, 0xFFFFFFFF),
        # every entry's local header offset points at the start of the file
        "cd_local_offsets_zero": _cd_field(data, cd_offset, eocd, 42, 0),
        # the central directory removed, the end record kept
        "cd_removed": data[:cd_offset] + data[eocd:],
        # the central directory duplicated
        "cd_twice": data[:eocd] + data[cd_offset:],
        # names rewritten so that no record is data.pkl
        "cd_names_renamed": data[:cd_offset] + data[cd_offset:eocd].replace(b"data.pkl", b"data.pkX")
        + data[eocd:],
        # compression method 8 (deflate) declared for stored records
        "cd_deflate": _cd_field(data, cd_offset, eocd, 10, 8, fmt="<H"),
    }
    cases = []
    for name, blob in variants.items():
        path = out_dir / f"{name}.pt"
        path.write_bytes(blob)
        cases.append((str(path), str(zip_pt), name))
    return cases


def _cd_entries(data, cd_offset, eocd):
    pos = cd_offset
    while pos < eocd and data[pos:pos + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack("<HHH", data[pos + 28:pos + 34])
        yield pos
        pos += 46 + n + m + k


def _cd_field(data, cd_offset, eocd, rel, value, fmt="<I"):
    out = bytearray(data)
    for pos in _cd_entries(data, cd_offset, eocd):
        struct.pack_into(fmt, out, pos + rel, value)
    return bytes(out)


def _cd_sizes(data, cd_offset, eocd, value):
    return _cd_field(_cd_field(data, cd_offset, eocd, 20, value), cd_offset, eocd, 24, value)


def _lying_safetensors_cases(out_dir):
    f32 = lambda shape, offsets: {"dtype": "F32", "shape": shape, "data_offsets": offsets}  # noqa: E731
    headers = {
        "offsets_beyond_file": ({"w": f32([4], [0, 16])}, bytes(8)),
        "terabyte_tensor": ({"w": f32([2**38], [0, 2**40])}, bytes(16)),
        "terabyte_2d": ({"w": f32([2**19, 2**19], [0, 2**40])}, b""),
        "absurd_shape_product": ({"w": f32([10**30, 10**30], [0, 16])}, bytes(16)),
        "negative_shape": ({"w": f32([-4], [0, 16])}, bytes(16)),
        "negative_offsets": ({"w": f32([4], [-16, 0])}, bytes(16)),
        "reversed_offsets": ({"w": f32([4], [16, 0])}, bytes(16)),
        "float_shape": ({"w": f32([4.0], [0, 16])}, bytes(16)),
        "bool_shape": ({"w": f32([True], [0, 4])}, bytes(16)),
        "three_offsets": ({"w": f32([4], [0, 8, 16])}, bytes(16)),
        "string_offsets": ({"w": f32([4], ["0", "16"])}, bytes(16)),
        "dtype_list": ({"w": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}}, bytes(16)),
        "dtype_dict": ({"w": {"dtype": {"a": 1}, "shape": [4], "data_offsets": [0, 16]}}, bytes(16)),
        "dtype_unknown": ({"w": {"dtype": "F128", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)),
        "spec_list": ({"w": [1, 2, 3]}, bytes(16)),
        "metadata_list": ({"__metadata__": [1], "w": f32([4], [0, 16])}, bytes(16)),
        "metadata_nested": ({"__metadata__": {"a": {"b": [1, None]}}, "w": f32([4], [0, 16])}, bytes(16)),
        "header_array": ([1, 2, 3], b""),
        "header_string": ("hello", b""),
        "header_number": (1e308, b""),
        "header_nan": (b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 16]}}', bytes(16)),
        "overlapping": ({"a": f32([4], [0, 16]), "b": f32([4], [0, 16])}, bytes(16)),
        "not_json": (b"{this is not json", b""),
        "not_utf8": (b'{"\xff\xfe": 1}', b""),
        "deep_nesting": (b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}", b""),
        "empty_object": (b"{}", b""),
    }
    cases = []
    for name, (header, data) in headers.items():
        path = out_dir / f"{name}.safetensors"
        path.write_bytes(_safetensors_bytes(header, data))
        cases.append((str(path), None, name))
    raw = [
        ("length_u64_max", struct.pack("<Q", 2**64 - 1) + b"{}"),
        ("length_2_63", struct.pack("<Q", 2**63) + b'{"w": 1}'),
        ("length_only", struct.pack("<Q", 8)),
        ("four_bytes", b"\x02\x00\x00\x00"),
        ("zero_length_header", struct.pack("<Q", 0) + b"{}"),
    ]
    for name, blob in raw:
        path = out_dir / f"{name}.safetensors"
        path.write_bytes(blob)
        cases.append((str(path), None, name))
    return cases


def _misc_cases(out_dir, valid):
    (out_dir / "a_directory.pt").mkdir()
    (out_dir / "empty.pt").write_bytes(b"")
    (out_dir / "wrong_magic.pt").write_bytes(b"XK\x03\x04" + valid[".pt"].read_bytes()[4:])
    (out_dir / "elf.pt").write_bytes(b"\x7fELF" + bytes(60))
    (out_dir / "pickle_proto_garbage.pt").write_bytes(b"\x80\x05" + os.urandom(0) + bytes(40))
    (out_dir / "zip_of_nothing.pt").write_bytes(_empty_zip(out_dir))
    return [(str(out_dir / n), None, n) for n in ("a_directory.pt", "empty.pt", "wrong_magic.pt",
                                                  "elf.pt", "pickle_proto_garbage.pt", "zip_of_nothing.pt")]


def _empty_zip(out_dir):
    path = out_dir / "_empty.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/notes.txt", "hello")
    return path.read_bytes()


WORKER = textwrap.dedent("""
    import json, sys
    from pytest_modelcheck.core.checkpoint import CheckpointError, compare_checkpoints, inspect_checkpoint

    cases = json.load(open(sys.argv[1]))
    results = []
    for path, valid, label in cases:
        for what, call in (("inspect", lambda: inspect_checkpoint(path)),
                           ("compare", lambda: compare_checkpoints(valid or path, path))):
            try:
                call()
                results.append([label, path, what, "ok", "", ""])
            except CheckpointError as exc:
                results.append([label, path, what, "CheckpointError", "", str(exc)])
            except BaseException as exc:
                results.append([label, path, what, "other", type(exc).__name__, str(exc)[:300]])
    json.dump(results, open(sys.argv[2], "w"))
""")


def _run_in_child(cases, tmp_path):
    """Run the worker on ``cases``; return (its results, its peak RSS in KiB, its exit status)."""
    case_file, result_file = tmp_path / "cases.json", tmp_path / "results.json"
    case_file.write_text(json.dumps(cases))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(case_file), str(result_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    with proc.stdout:
        out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, f"the child crashed (exit {proc.returncode}): {out.decode()[-2000:]}"
    return json.loads(result_file.read_text()), usage.ru_maxrss


def _import_only_rss_kib() -> int:
    """Peak RSS (KiB) of a child that imports what the worker imports and does nothing else."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", "import torch, pytest_modelcheck.core.checkpoint;"
                             " torch.zeros(1)"], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0
    return usage.ru_maxrss


def _problems(results):
    problems = []
    for label, path, what, outcome, exc_type, message in results:
        if outcome == "other":
            problems.append(f"{label} ({what}): {exc_type}: {message}")
        elif outcome == "CheckpointError":
            if "\n" in message or not message.startswith(f"checkpoint {path!r}: "):
                problems.append(f"{label} ({what}): message not one line naming the file: {message!r}")
    return problems


def test_damaged_checkpoints_give_a_one_line_error_in_bounded_memory(tmp_path):
    cases_dir = tmp_path / "cases"
    cases_dir.mkdir()
    valid = _valid_files(tmp_path)
    cases = (_fuzzed_cases(valid, cases_dir) + _central_directory_cases(valid[".pt"], cases_dir)
             + _lying_safetensors_cases(cases_dir) + _misc_cases(cases_dir, valid))
    results, max_rss_kib = _run_in_child(cases, tmp_path)
    assert len(results) == 2 * len(cases)
    problems = _problems(results)
    assert problems == [], "\n".join(problems)
    growth = max_rss_kib - _import_only_rss_kib()
    assert growth < MAX_RSS_GROWTH_KIB, (f"peak RSS grew by {growth} KiB (to {max_rss_kib} KiB)"
                                         " while headers declared terabytes")
    by_label = {(r[0], r[2]): r for r in results}
    # the lies are caught, not believed: each of these is refused
    for label in ("terabyte_tensor", "terabyte_2d", "negative_shape", "deep_nesting", "dtype_list",
                  "length_u64_max", "cd_removed"):
        assert by_label[(label, "inspect")][3] == "CheckpointError", by_label[(label, "inspect")]


def test_the_valid_originals_load_and_compare(tmp_path):
    valid = _valid_files(tmp_path)
    for path in valid.values():
        info = inspect_checkpoint(path)
        assert info.total_numel == 12 + 4 + 1  # 4x3 weight, 4 bias, one scalar
        assert compare_checkpoints(path, path).unchanged


def test_a_child_that_crashes_fails_the_test(tmp_path):
    """The harness itself: a native crash in the child is reported, not swallowed."""
    global WORKER
    saved = WORKER
    WORKER = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    try:
        with pytest.raises(AssertionError, match=r"the child crashed \(exit -11\)"):
            _run_in_child([], tmp_path)
    finally:
        WORKER = saved


# --------------------------------------------------------------------------- hostile pickles

class _Reduce:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


class _Holder:
    """A plain object with the payload one level down, as a checkpoint's "extra" entry."""

    def __init__(self, payload):
        self.inner = {"cfg": [payload]}


def _zoo(marker):
    touch = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": _Reduce(os.system, (f"touch {marker}",)),
        "eval": _Reduce(eval, (touch,)),
        "exec": _Reduce(exec, (touch,)),
        "subprocess.Popen": _Reduce(subprocess.Popen, (["touch", str(marker)],)),
        "builtins.__import__": _Reduce(builtins.__import__, ("antigravity",)),
        "nested_object": _Holder(_Reduce(os.system, (f"touch {marker}",))),
    }


ZOO_NAMES = list(_zoo("x"))


@pytest.mark.parametrize("container", ["zip", "legacy", "plain-pickle"])
@pytest.mark.parametrize("payload", ZOO_NAMES)
def test_hostile_pickle_zoo_never_runs(tmp_path, payload, container):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    obj = {"state_dict": {"w": torch.ones(2)}, "extra": _zoo(marker)[payload]}
    if container == "zip":
        torch.save(obj, path)
    elif container == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    for call in (inspect_checkpoint, lambda p: compare_checkpoints(p, p)):
        with pytest.raises(CheckpointError) as exc:
            call(path)
        message = str(exc.value)
        assert "\n" not in message and message.startswith(f"checkpoint {str(path)!r}: ")
        assert "untrusted (weights_only=False) load" in message
    assert not marker.exists()
