"""One owner per train.out_dir, and the mark of a finished run.

The owner is the process of global rank 0: it holds a POSIX record lock (fcntl.lockf) on out_dir/.owner for the
whole run and writes who it is (host, pid, start time) into that file. A second launch on the same out_dir finds
the lock taken and refuses in one line naming the owner. The kernel drops the lock when its process dies, however
it dies (SIGKILL and OOM included), so a stale .owner of a dead run is taken over with a note, never by guessing
from its content. On a shared filesystem the lock is the server's: NFSv4 and NFSv3 with lockd honour lockf across
nodes (a crashed node's locks go when its lease or lock state expires, ~90 s on NFSv4); Lustre needs the
`flock` mount option; a filesystem without locks gets a warning and no protection.

finished.json is written by rank 0 after the test score and the registration: a launch that finds it exits 0
at once ("already finished") and touches nothing.
"""

import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from job import cli

OWNER = ".owner"
FINISHED = "finished.json"


class OutDirError(RuntimeError):
    """out_dir is owned by another live launch, or unusable; one line."""


class Ownership:
    """The lock on out_dir/.owner, held from acquire() until the process ends (or release())."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / OWNER
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take out_dir or raise OutDirError naming its owner; returns a note when a dead owner's file was found."""
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutDirError(f"cannot use train.out_dir {self.out_dir}: {e.strerror or e}") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                owner = _read(fd) or "a launch that is starting"
                os.close(fd)
                raise OutDirError(f"train.out_dir {self.out_dir} is in use by {owner}: wait for it to end, stop it, "
                                  f"or choose another train.out_dir") from None
            cli.warning(f"train.out_dir {self.out_dir} cannot be locked ({e.strerror}); nothing stops a second "
                        f"launch on it from writing beside this one")
        before = _read(fd)
        me = (f"pid {os.getpid()} on {socket.gethostname()} "
              f"(started {datetime.datetime.now().astimezone().isoformat(timespec='seconds')})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return f"took over train.out_dir {self.out_dir} from {before}, which has ended" if before else None

    def release(self) -> None:
        """Empty .owner and drop the lock (the process's end drops it too)."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace").strip()


def finished(out_dir: str) -> dict | None:
    """The record finished.json holds, or None if the run in out_dir has not finished."""
    path = Path(out_dir) / FINISHED
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise OutDirError(f"{path} is unreadable ({e}); delete it to run the end of the job again") from None


def mark_finished(out_dir: str, record: dict) -> None:
    """Write finished.json atomically (after the test score and the registration)."""
    path = Path(out_dir) / FINISHED
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
