"""Per-step logs of training-dynamics checks: CSV files and TensorBoard event files.

``write_run_logs(logdir, nodeid, results)`` writes, for one test, the per-step numbers that
``model_overfits`` (``losses``, ``terms``), ``grad_norms_stable`` (``grad_norms``, ``losses``),
``lr_schedule`` (``lrs``, ``expected_lrs``, ``losses``) and ``loss_components`` (``terms``,
``d_total``, ``g_total``) record in their metrics:

- ``logdir/<test>/<check>.csv``: a ``step`` column, then one column per series;
- ``logdir/<test>/events.out.tfevents.<time>.modelcheck``: one TensorBoard run per test, tags
  ``<check>/<series>``, so TensorBoard overlays the same tag across tests (``tensorboard
  --logdir logdir``).

TensorBoard is not needed to write them: the event file is TFRecord framing (little-endian
uint64 length, masked CRC-32C of the length, the bytes, masked CRC-32C of the bytes) around
``tensorflow.Event`` protobuf messages, encoded here by hand. :func:`read_event_file` decodes
them back. Nothing here imports pytest or torch.
"""
from __future__ import annotations

import csv
import hashlib
import math
import os
import re
import socket
import struct
import time
from typing import Any, Iterator, Optional

STEP_CHECKS = ("model_overfits", "grad_norms_stable", "lr_schedule", "loss_components")
FILE_VERSION = "brain.Event:2"
EVENT_SUFFIX = ".modelcheck"

# -- CRC-32C (Castagnoli), table-driven -----------------------------------------------------
_POLY = 0x82F63B78  # reflected 0x1EDC6F41


def _make_table() -> list:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C of ``data`` (continuing from ``crc``).

    >>> hex(crc32c(b"123456789"))   # the standard check value of CRC-32C
    '0xe3069283'
    """
    crc ^= 0xFFFFFFFF
    table = _TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The masked CRC that TFRecord stores: rotate right by 15 bits, add 0xa282ead8.

    >>> hex(masked_crc32c(b""))
    '0xa282ead8'
    """
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: length, masked CRC of the length, data, masked CRC of the data.

    >>> len(tfrecord(b"abc"))   # 8 + 4 + 3 + 4
    19
    """
    header = struct.pack("<Q", len(data))
    return (header + struct.pack("<I", masked_crc32c(header)) + data
            + struct.pack("<I", masked_crc32c(data)))


# -- protobuf wire format, the few encodings an Event needs ----------------------------------
def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # int64 two's complement, as protobuf does
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _len_field(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int = 0, *, file_version: Optional[str] = None,
                 scalars: Optional[dict] = None) -> bytes:
    """An ``Event`` message: wall_time (1, double), step (2, int64), file_version (3) or a
    summary (5) of ``Value{tag (1), simple_value (2, float)}`` for each scalar.

    >>> e = encode_event(0.0, 3, scalars={"a": 1.0}).hex()
    >>> # key 0x09 + 8-byte double | key 0x10 + varint 3 | summary 0x2a len 10 | value 0x0a len 8
    >>> # | tag 0x0a len 1 "a" | key 0x15 + float 1.0 (0x3f800000, little-endian)
    >>> e == "09" + "00" * 8 + "1003" + "2a0a" + "0a08" + "0a0161" + "15" + "0000803f"
    True
    """
    out = _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(step)
    if file_version is not None:
        out += _len_field(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _len_field(1, _len_field(1, tag.encode()) + _key(2, 5) + struct.pack("<f", value))
            for tag, value in scalars.items())
        out += _len_field(5, summary)
    return out


# -- reading back -----------------------------------------------------------------------------
class EventFileError(ValueError):
    """A corrupt event file: bad framing or a CRC mismatch."""


def _read_varint(buf: bytes, pos: int) -> tuple:
    shift = value = 0
    while True:
        if pos >= len(buf):
            raise EventFileError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple]:
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        else:
            raise EventFileError(f"unsupported wire type {wire}")
        yield field, wire, value


def decode_event(data: bytes) -> dict:
    """Decode an ``Event`` written by :func:`encode_event` (unknown fields are ignored).

    >>> decode_event(encode_event(1.5, 2, scalars={"loss": 0.25}))
    {'wall_time': 1.5, 'step': 2, 'scalars': {'loss': 0.25}}
    """
    event: dict = {"wall_time": 0.0, "step": 0}
    for field, wire, value in _fields(data):
        if field == 1 and wire == 1:
            event["wall_time"] = struct.unpack("<d", value)[0]
        elif field == 2 and wire == 0:
            event["step"] = value - (1 << 64) if value >= 1 << 63 else value
        elif field == 3 and wire == 2:
            event["file_version"] = value.decode()
        elif field == 5 and wire == 2:
            scalars = event.setdefault("scalars", {})
            for f, w, v in _fields(value):
                if f != 1 or w != 2:
                    continue
                tag, simple = None, None
                for vf, vw, vv in _fields(v):
                    if vf == 1 and vw == 2:
                        tag = vv.decode()
                    elif vf == 2 and vw == 5:
                        simple = struct.unpack("<f", vv)[0]
                if tag is not None and simple is not None:
                    scalars[tag] = simple
    return event


def read_records(path: str) -> list:
    """The payloads of a TFRecord file, every length and data CRC verified.

    >>> import tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "r")
    >>> with open(p, "wb") as fh: _ = fh.write(tfrecord(b"x") + tfrecord(b"yz"))
    >>> read_records(p)
    [b'x', b'yz']
    """
    with open(path, "rb") as fh:
        raw = fh.read()
    out, pos = [], 0
    while pos < len(raw):
        if pos + 12 > len(raw):
            raise EventFileError(f"{path}: truncated record header at byte {pos}")
        header = raw[pos:pos + 8]
        (n,) = struct.unpack("<Q", header)
        (crc,) = struct.unpack("<I", raw[pos + 8:pos + 12])
        if crc != masked_crc32c(header):
            raise EventFileError(f"{path}: length CRC mismatch at byte {pos}")
        data = raw[pos + 12:pos + 12 + n]
        if len(data) != n or pos + 16 + n > len(raw):
            raise EventFileError(f"{path}: truncated record at byte {pos}")
        (crc,) = struct.unpack("<I", raw[pos + 12 + n:pos + 16 + n])
        if crc != masked_crc32c(data):
            raise EventFileError(f"{path}: data CRC mismatch at byte {pos}")
        out.append(data)
        pos += 16 + n
    return out


def read_event_file(path: str) -> list:
    """Every event of an event file as dicts (see :func:`decode_event`).

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> paths = write_run_logs(d, "t.py::test_a", [{"check": "model_overfits",
    ...     "metrics": {"losses": [2.0, 1.0]}}], wall_time=0.0)
    >>> ev = read_event_file([p for p in paths if "tfevents" in p][0])
    >>> ev[0]["file_version"], [e["scalars"] for e in ev[1:]]
    ('brain.Event:2', [{'model_overfits/losses': 2.0}, {'model_overfits/losses': 1.0}])
    """
    return [decode_event(r) for r in read_records(path)]


# -- the run logs -----------------------------------------------------------------------------
def run_dirname(nodeid: str, limit: int = 120) -> str:
    """A directory name for a test id: unsafe characters become ``_``, ``::`` becomes ``__``;
    long ids are cut and end with a hash so they stay distinct.

    >>> run_dirname("tests/test_m.py::test_fit[cpu-0.5]")
    'tests_test_m.py__test_fit_cpu-0.5_'
    """
    name = re.sub(r"[^A-Za-z0-9._-]", "_", nodeid.replace("::", "__")).strip(".") or "test"
    if len(name) > limit:
        digest = hashlib.sha1(nodeid.encode()).hexdigest()[:10]
        name = name[:limit - 11] + "-" + digest
    return name


def _claim_rundir(logdir: str, nodeid: str) -> str:
    """``logdir/<run_dirname(nodeid)>``, made and marked with the test id (a ``.nodeid`` file);
    when another id already owns that name (``a/b`` and ``a_b`` both read ``a_b``), the
    name gets a hash of the id."""
    name = run_dirname(nodeid)
    for candidate in (name, f"{name[:109]}-{hashlib.sha1(nodeid.encode()).hexdigest()[:10]}"):
        rundir = os.path.join(logdir, candidate)
        os.makedirs(rundir, exist_ok=True)
        marker = os.path.join(rundir, ".nodeid")
        try:
            with open(marker, "x", encoding="utf-8") as fh:
                fh.write(nodeid)
            return rundir
        except FileExistsError:
            with open(marker, encoding="utf-8") as fh:
                if fh.read() == nodeid:
                    return rundir
    return rundir


def _number(v: Any) -> Optional[float]:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            x = float(v)   # non-finite values are stored as 'nan', 'inf', '-inf'
        except ValueError:
            return None
        return x if not math.isfinite(x) else None
    return None


def _as_series(values: Any) -> Optional[list]:
    if not isinstance(values, list) or not values:
        return None
    out = [_number(v) for v in values]
    return None if any(v is None for v in out) else out


def step_series(metrics: dict) -> dict:
    """The per-step series in a result's metrics: ``{name: [float, ...]}``; lists of numbers
    directly, dicts of lists (loss terms) as ``<key>/<term>``.

    >>> step_series({"losses": [1, "nan"], "terms": {"mse": [0.5]}, "lr": 0.1, "names": ["a"]})
    {'losses': [1.0, nan], 'terms/mse': [0.5]}
    """
    out = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, dict):
            for sub, vs in value.items():
                series = _as_series(vs)
                if series is not None:
                    out[f"{key}/{sub}"] = series
        else:
            series = _as_series(value)
            if series is not None:
                out[key] = series
    return out


def _fmt(v: float) -> str:
    return repr(v) if math.isfinite(v) else str(v)


def _write_csv(path: str, series: dict) -> None:
    steps = max(len(v) for v in series.values())
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step"] + list(series))
        for t in range(steps):
            w.writerow([t] + [_fmt(v[t]) if t < len(v) else "" for v in series.values()])
    os.replace(tmp, path)


def write_run_logs(logdir: str, nodeid: str, results: list, *, checks: Any = STEP_CHECKS,
                   wall_time: Optional[float] = None) -> list:
    """Write the per-step series of ``results`` (``CheckResult`` objects or their dicts) under
    ``logdir/<run_dirname(nodeid)>/``: ``<check>.csv`` and one TensorBoard event file (tags
    ``<check>/<series>``, replacing one written earlier for the same test). Only results of
    ``checks`` count (``None``: every result with a per-step series). Returns the paths
    written; nothing is written (not even the directory) when no result has a series.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> paths = write_run_logs(d, "t.py::test_a", [{"check": "grad_norms_stable",
    ...     "metrics": {"grad_norms": [3.0, 2.5], "losses": [1.0, 0.5], "steps_run": 2}}])
    >>> [os.path.basename(p).split(".")[0] for p in paths]
    ['grad_norms_stable', 'events']
    >>> with open(paths[0]) as fh:
    ...     print(fh.read().strip())
    step,grad_norms,losses
    0,3.0,1.0
    1,2.5,0.5
    """
    per_check: dict = {}
    for r in results:
        d = r.to_dict() if hasattr(r, "to_dict") else r
        check = str(d.get("check", "check"))
        if checks is not None and check not in checks:
            continue
        series = step_series(d.get("metrics") or {})
        if series:
            key, n = check, 2
            while key in per_check:   # the same check twice in one test
                key, n = f"{check}_{n}", n + 1
            per_check[key] = series
    if not per_check:
        return []
    rundir = _claim_rundir(logdir, nodeid)
    paths = []
    for check, series in per_check.items():
        path = os.path.join(rundir, re.sub(r"[^A-Za-z0-9._-]", "_", check) + ".csv")
        _write_csv(path, series)
        paths.append(path)
    now = time.time() if wall_time is None else float(wall_time)
    steps: dict = {}
    for check, series in per_check.items():
        for name, values in series.items():
            for t, v in enumerate(values):
                steps.setdefault(t, {})[f"{check}/{name}"] = v
    records = [tfrecord(encode_event(now, 0, file_version=FILE_VERSION))]
    records += [tfrecord(encode_event(now, t, scalars=steps[t])) for t in sorted(steps)]
    for old in os.listdir(rundir):
        if old.startswith("events.out.tfevents.") and old.endswith(EVENT_SUFFIX):
            os.remove(os.path.join(rundir, old))
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
    path = os.path.join(rundir, f"events.out.tfevents.{int(now)}.{host}{EVENT_SUFFIX}")
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(b"".join(records))
    os.replace(tmp, path)
    paths.append(path)
    return paths
