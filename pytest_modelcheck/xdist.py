"""pytest-xdist scheduling: tests marked ``modelcheck_exclusive`` share one worker (the
accelerator to themselves); ``--dist loadgroup`` is chosen when ``-n`` is given without
``--dist``."""
from __future__ import annotations

import os
from typing import Any

import pytest




# -- tests that must have the accelerator to themselves (one xdist worker) ------------------
EXCLUSIVE_MARKER = "modelcheck_exclusive"
EXCLUSIVE_GROUP = "modelcheck-exclusive"
EXCLUSIVE_HELP = (f"{EXCLUSIVE_MARKER}: run on a single xdist worker: GPU-bound model tests"
                  " that must not share the device (needs --dist loadgroup, which"
                  " pytest-modelcheck picks when -n is given without --dist)")
WORKER_FLAG = "modelcheck_loadgroup"


def _dist_chosen_by_user(config: pytest.Config) -> bool:
    """Whether --dist / -d / --distload was given (command line, addopts, PYTEST_ADDOPTS)."""
    import shlex

    args = [str(a) for a in config.invocation_params.args]
    args += list(config.getini("addopts"))
    args += shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))
    return any(a in ("--dist", "-d", "--distload") or a.startswith("--dist=") for a in args)


def _configure_exclusive(config: pytest.Config) -> None:
    """Register the marker; on the xdist controller, turn the default ``load`` (what -n
    gives) into ``loadgroup`` so that the group is honoured. An explicit --dist is kept."""
    config.addinivalue_line("markers", EXCLUSIVE_HELP)
    if hasattr(config, "workerinput"):
        return
    if config.getoption("dist", None) == "load" and not _dist_chosen_by_user(config):
        config.option.dist = "loadgroup"


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    # workers re-parse the command line, so they do not see a dist switched above
    node.workerinput[WORKER_FLAG] = node.config.getoption("dist", None) == "loadgroup"


def _mark_exclusive(config: pytest.Config, items: list) -> None:
    """Put every ``modelcheck_exclusive`` test in one xdist group."""
    if getattr(config, "workerinput", {}).get(WORKER_FLAG):
        config.option.loadgroup = True  # read by xdist's own modifyitems, which runs after
    if not config.pluginmanager.hasplugin("xdist"):
        return  # nothing to group; xdist_group is not even a registered marker then
    for item in items:
        if item.get_closest_marker(EXCLUSIVE_MARKER) is not None:
            item.add_marker(pytest.mark.xdist_group(EXCLUSIVE_GROUP))


def _suffix_exclusive_ids(config: pytest.Config, items: list) -> None:
    """Give exclusive tests the ``@group`` node-id suffix that ``--dist loadgroup`` schedules
    by, where pytest-xdist could not: xdist 3.8 writes ``item._nodeid``, which pytest 9's
    structured node ids ignore (pytest-dev/pytest-xdist#1386). A no-op where xdist did it."""
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        if item.get_closest_marker(EXCLUSIVE_MARKER) is None or "@" in item.nodeid:
            continue
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        new = f"{item.nodeid}@{'_'.join(names)}"
        if hasattr(item, "_id"):
            item._id = type(item._id).parse(new)
        else:
            item._nodeid = new

