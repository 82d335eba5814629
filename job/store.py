"""The MLflow store as the job meets it: a new sqlite store created by one launch at a time, its failures said in
one line (a full disk as such), and MLflow's own multi-line reports of them kept out of the log.

Imports nothing of MLflow: the MLflow run (job/mlflow_run.py) and preflight call these around their own MLflow calls.
"""

import contextlib
import errno
import fcntl
import logging
import os

DISK_FULL = "disk full"


@contextlib.contextmanager
def store_lock(uri: str):
    """For a sqlite store, a lock on the file beside it (<db>.lock) for the block; nothing for other stores.
    MLflow creates and migrates a new sqlite store unguarded on first use, and launches that first use it at once
    (a Slurm array's tasks) broke each other's migration ("duplicate column name: step", "Online migration ...").
    One launch makes the store under an exclusive lock; the others wait, then check it (MLflow's check of a made
    store takes seconds) under shared locks, side by side."""
    path = uri.removeprefix("sqlite:///").split("?")[0] if uri.startswith("sqlite:///") else None
    try:
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644) if path else None
    except OSError:  # a directory this launch cannot write: MLflow's own error on the store says so
        fd = None
    try:
        if fd is not None:
            with contextlib.suppress(OSError):  # a filesystem without locks: unguarded, as MLflow itself is
                _lock(fd, path)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # drops the lock


def _lock(fd: int, path: str) -> None:
    """Exclusive where this launch makes the store, shared where it finds it made."""
    def made() -> bool:  # made under the exclusive lock, or never begun: sqlite leaves an empty file until then
        return os.path.exists(path) and os.path.getsize(path) > 0

    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        fcntl.lockf(fd, fcntl.LOCK_SH)  # waits while another launch makes the store
        if not made():  # its maker ended first: make it here, holding nothing while waiting (no deadlock)
            fcntl.lockf(fd, fcntl.LOCK_UN)
            fcntl.lockf(fd, fcntl.LOCK_EX)
        return
    if made():
        fcntl.lockf(fd, fcntl.LOCK_SH)  # nothing to make: the others may check it alongside


def reason(e: BaseException) -> str:
    """An MLflow failure in one line: DISK_FULL for a store that cannot grow (sqlite's "database or disk is full",
    ENOSPC, also inside a server's answer), else the first line of its message that is not SQLAlchemy's preamble
    ("(raised as a result of Query-invoked autoflush; ...)"), cut to 300 characters."""
    return _reason(str(e)) or type(e).__name__


def _reason(text: str) -> str:
    if "database or disk is full" in text or "No space left on device" in text:
        return DISK_FULL
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("(raised as a result")]
    return lines[0][:300] if lines else ""


class _StoreReports(logging.Filter):
    """MLflow's own reports of a failed store call, made short: the store logs each failure with its traceback
    (~50 lines, again on every retry) and raises it, and the job says it in one line of its own; the system-metrics
    thread's multi-line warning (every 10 s) keeps its reason's line only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        if record.name == "mlflow.store.db.utils":
            return False
        head, _, rest = record.getMessage().partition(": ")
        record.msg, record.args = (f"{head}: {_reason(rest)}" if rest else _reason(head)), ()
        return True


_REPORTS = _StoreReports()


def quiet_reports() -> None:
    """Put the filter on MLflow's store and system-metrics loggers (once: addFilter skips a filter it has)."""
    for name in ("mlflow.store.db.utils", "mlflow.system_metrics.system_metrics_monitor"):
        logging.getLogger(name).addFilter(_REPORTS)
