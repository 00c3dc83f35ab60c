"""One baseline from the baselines that the shards of a split test suite saved.

A suite that outgrows one CI runner is split (a CI matrix with ``pytest-split`` or ``-k``
selections, one runner per shard); each shard saves its own baseline file. :func:`merge_baselines`
makes one of them: per machine fingerprint, the union of the shards' tests. A test that two
shards both hold must hold the same metrics in both (a shard that ran it twice, or two
machines sharing a fingerprint, would otherwise decide silently which one the gate compares
against): a difference raises :class:`ShardConflict` naming the test, the metric and the files.
"""
from __future__ import annotations

from typing import Any

from .errors import UsageError


class ShardConflict(UsageError):
    """Two shards hold different entries for the same test (one line, naming both)."""


def merge_baselines(baselines: list, names: Any = None) -> Any:
    """The union of the shards' baselines (``Baseline`` objects; ``names`` label them in
    errors, e.g. their file names). The latest save time of each machine is kept.

    >>> from pytest_modelcheck.core.baseline import Baseline
    >>> a = Baseline({"m": {"cpu": "x"}}, {"m": {"t.py::a": {"p": {"value": 1}}}}, {"m": 1.0})
    >>> b = Baseline({"m": {"cpu": "x"}}, {"m": {"t.py::b": {"p": {"value": 2}}}}, {"m": 2.0})
    >>> merged = merge_baselines([a, b])
    >>> sorted(merged.entries["m"]), merged.saved
    (['t.py::a', 't.py::b'], {'m': 2.0})
    >>> c = Baseline({"m": {"cpu": "x"}}, {"m": {"t.py::b": {"p": {"value": 3}}}}, {"m": 3.0})
    >>> merge_baselines([b, c], ["shard1.json", "shard2.json"])
    Traceback (most recent call last):
    ...
    pytest_modelcheck.core.shards.ShardConflict: t.py::b: metric 'p' differs between shard1.json ({'value': 2}) and shard2.json ({'value': 3}); each test belongs to one shard: check the split, or merge the shards of one machine only
    """
    from .baseline import Baseline

    names = list(names or [f"shard {i + 1}" for i in range(len(baselines))])
    merged = Baseline()
    origin: dict = {}  # (machine key, nodeid) -> the name of the shard it came from
    for name, shard in zip(names, baselines):
        for key, tests in shard.entries.items():
            _same_machine(merged.machines.get(key), shard.machines.get(key), key, name,
                          origin_name=_first_name(origin, key))
            merged.machines[key] = shard.machines.get(key, merged.machines.get(key, {}))
            merged.saved[key] = max(merged.saved.get(key, 0.0), shard.saved.get(key, 0.0))
            target = merged.entries.setdefault(key, {})
            for nodeid, metrics in tests.items():
                if nodeid in target and target[nodeid] != metrics:
                    _conflict(nodeid, target[nodeid], metrics, origin[(key, nodeid)], name)
                target[nodeid] = metrics
                origin.setdefault((key, nodeid), name)
    return merged


def _first_name(origin: dict, key: str) -> str:
    return next((name for (k, _), name in origin.items() if k == key), "")


def _same_machine(mine: Any, theirs: Any, key: str, name: str, origin_name: str) -> None:
    if mine is not None and theirs is not None and mine != theirs:
        raise ShardConflict(f"machine {key}: its fingerprint differs between {origin_name} and"
                            f" {name}; expected the same machine description under one key")


def _conflict(nodeid: str, old: dict, new: dict, first: str, second: str) -> None:
    metric = next((m for m in sorted(set(old) | set(new)) if old.get(m) != new.get(m)), "?")
    raise ShardConflict(f"{nodeid}: metric {metric!r} differs between {first}"
                        f" ({_short(old.get(metric))}) and {second} ({_short(new.get(metric))});"
                        " each test belongs to one shard: check the split, or merge the shards"
                        " of one machine only")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
