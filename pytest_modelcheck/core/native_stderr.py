"""Drop the status lines native libraries write straight to file descriptor 2.

torch's profiler back end (kineto) prints ``USDT: ... profiler_start`` / ``profiler_stop`` and
``STAGE: ...`` lines on every profiling cycle, from C++, whatever ``KINETO_LOG_LEVEL`` says; a
memory measurement per check would fill a test log with them. :func:`filtered_stderr`
redirects descriptor 2 to a temporary file around a block and writes back every other line,
so warnings and errors from the block still reach the user.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterator

KINETO_PREFIXES = ("USDT:", "STAGE:")


@contextlib.contextmanager
def filtered_stderr(prefixes: tuple = KINETO_PREFIXES) -> Iterator[None]:
    """Run the block with descriptor 2 captured; re-emit the lines not starting with a prefix.

    >>> import os
    >>> with filtered_stderr(("NOISE:",)):
    ...     _ = os.write(2, b"NOISE: dropped\\n")
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no descriptor 2 (a detached process): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [line for line in sink.read().splitlines(keepends=True)
                    if not line.startswith(tuple(p.encode() for p in prefixes))]
            if kept:
                os.write(2, b"".join(kept))
