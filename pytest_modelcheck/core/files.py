"""Files written atomically: reports, baselines and logs are replaced in one step, so a reader
sees the old or the new file and a killed writer leaves nothing half written (no pytest, no
torch here; ``report/`` and ``core/baseline.py`` both write through it)."""
from __future__ import annotations

import os
import stat
import tempfile


def _mode_for(path: str) -> int:
    """The mode an ordinary new file gets (0666 less the umask), or the existing file's."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


#: A ``.modelcheck-*.tmp`` file older than this (seconds) is a leftover of a writer that was
#: killed: the next write into the same folder removes it. A live write takes well under it.
STALE_TMP_S = 600.0


def _tmp_prefix(target: str) -> str:
    """The name prefix of the temporary files that ``target`` is written through."""
    return f".modelcheck-{os.path.basename(target)[:40]}-"


def remove_stale_temps(folder: str, prefix: str = ".modelcheck-",
                       older_than: float = STALE_TMP_S) -> list:
    """Remove the ``prefix*.tmp`` files in ``folder`` last written more than ``older_than``
    seconds ago (leftovers of writers killed mid-write); returns the names removed.

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> open(os.path.join(d, ".modelcheck-x.tmp"), "w").close()
    >>> os.utime(os.path.join(d, ".modelcheck-x.tmp"), (0, 0))
    >>> remove_stale_temps(d), os.listdir(d)
    (['.modelcheck-x.tmp'], [])
    """
    import time

    removed: list = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        full = os.path.join(folder, name)
        try:
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode) and now - st.st_mtime >= older_than:
                os.unlink(full)
                removed.append(name)
        except OSError:
            pass  # gone already, or not ours to remove
    return removed


def _publish_unnamed(folder: str, target: str, data: bytes, mode: int) -> bool:
    """Write ``data`` to an unnamed file in ``folder`` (``O_TMPFILE``: a writer killed while
    writing leaves nothing behind), give it a name and move it onto ``target``. False where
    the system or file system has no ``O_TMPFILE`` (the caller then uses a named temp)."""
    import secrets

    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not os.path.isdir("/proc/self/fd"):
        return False
    try:
        fd = os.open(folder, flag | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError:
        return False
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.fchmod(fd, mode)  # O_TMPFILE makes 0600; a report is an ordinary file
        for _ in range(10):
            tmp = os.path.join(folder, _tmp_prefix(target) + secrets.token_hex(4) + ".tmp")
            try:
                os.link(f"/proc/self/fd/{fd}", tmp, follow_symlinks=True)
                break
            except FileExistsError:
                continue
            except OSError:
                return False
        else:
            return False
    finally:
        os.close(fd)
    try:
        os.replace(tmp, target)  # named for a few microseconds only
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return True


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``: readers see the
    old or the new file, never a partial one.

    A symbolic link at ``path`` is followed: its target is replaced, the link stays. The
    temporary file is unnamed while it is written (``O_TMPFILE``, where the file system has
    it), so a writer killed mid-write leaves no ``.modelcheck-*.tmp`` that could be committed;
    elsewhere such a leftover is removed by the next write into the folder once it is
    :data:`STALE_TMP_S` old.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "r.json")
    >>> atomic_write_text(p, "{}")
    >>> with open(p) as fh:
    ...     fh.read()
    '{}'
    """
    target = os.path.realpath(os.fspath(path))
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    remove_stale_temps(folder)
    data = text.encode("utf-8")
    mode = _mode_for(target)
    if _publish_unnamed(folder, target, data, mode):
        return
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(target), suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600; a report is an ordinary file
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
