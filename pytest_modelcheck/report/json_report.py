"""The ``--modelcheck-json`` file: every model test with its check results, written atomically."""
from __future__ import annotations

import json
import os
import platform
import tempfile
from typing import Any


def _mode_for(path: str) -> int:
    """The mode an ordinary new file gets (0666 less the umask), or the existing file's."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``: readers see the
    old or the new file, never a partial one.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "r.json")
    >>> atomic_write_text(p, "{}")
    >>> with open(p) as fh:
    ...     fh.read()
    '{}'
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".modelcheck-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _mode_for(path))  # mkstemp makes 0600; a report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def results_document(rows: list) -> dict:
    """The JSON document: format version, environment and one entry per model test."""
    import sys

    torch_version = None
    if "torch" in sys.modules:
        torch_version = sys.modules["torch"].__version__
    tests = sorted(rows, key=lambda r: r["nodeid"])
    return {
        "format": "pytest-modelcheck/1",
        "environment": {"python": platform.python_version(), "torch": torch_version,
                        "machine": platform.machine(), "processor": platform.processor()},
        "summary": {
            "tests": len(tests),
            "checks": sum(len(t["results"]) for t in tests),
            "failed_checks": sum(1 for t in tests for r in t["results"] if r["passed"] is False),
        },
        "tests": tests,
    }


def write_json(path: str, rows: list, **extra: Any) -> None:
    """Write the results of a session to ``path`` (atomically)."""
    doc = results_document(rows)
    doc.update(extra)
    atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=False) + "\n")
