"""train.out_dir: its layout, its one owner, and the mark of a finished run.

Every name in out_dir is set here, except those of the files their owners name: metrics.jsonl and steps.jsonl
(job/records.py), last.pt, last.prev.pt and best.pt in checkpoints/ (job/checkpoint.py, job/durable.py):

    out_dir/
        config.yaml                   the resolved config of the latest launch (CONFIG; job/train.py)
        metrics.jsonl                 one record per epoch, then the test's (job/records.py)
        steps.jsonl                   every optimizer step's seconds, with train.step_times (job/records.py)
        checkpoints/                  last.pt, last.prev.pt, best.pt (CHECKPOINTS; job/checkpoint.py)
        learning_curves.png           figures of the finished run (LEARNING_CURVES, CONFUSION_MATRIX;
        confusion_matrix.png            job/tracking.py draws them with job/plots.py)
        profile/rank<N>/              train.profile's trace and op table per rank (PROFILE; job/profile.py)
        nccl_trace/rank_<N>           NCCL's flight recorder, dumped on a collective timeout (NCCL_TRACE)
        .owner                        the lock of the launch that owns out_dir (OWNER)
        finished.json                 the mark of a finished run (FINISHED)

The owner is the process of global rank 0: it holds a POSIX record lock (fcntl.lockf) on out_dir/.owner for the
whole run and writes who it is (host, pid, start time) into that file. A second launch on the same out_dir finds
the lock taken and refuses in one line naming the owner. The kernel drops the lock when its process dies, however
it dies (SIGKILL and OOM included), so a stale .owner of a dead run is taken over with a note, never by guessing
from its content. On a shared filesystem the lock is the server's: NFSv4 and NFSv3 with lockd honour lockf across
nodes (a crashed node's locks go when its lease or lock state expires, ~90 s on NFSv4); Lustre needs the
`flock` mount option; a filesystem without locks gets a warning and no protection.

finished.json is written by rank 0 once the test score, the registration and the MLflow run are complete: a
launch of the same config that finds it exits 0 at once ("already finished") and touches nothing; a launch with
other settings is refused. A run whose MLflow logging was incomplete (exit 3) is not marked: the next launch
does the end of the run again.
"""

import datetime
import errno
import fcntl
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from job import cli, config
from job.distributed import raise_together
from job.durable import write_atomically

CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
LEARNING_CURVES = "learning_curves.png"
CONFUSION_MATRIX = "confusion_matrix.png"
PROFILE = "profile"
NCCL_TRACE = "nccl_trace"
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
            raise OutDirError(f"cannot write to train.out_dir {self.out_dir}: {e.strerror or e}") from None
        locked = True
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                owner = _read(fd) or "a launch that is starting"
                os.close(fd)
                raise OutDirError(f"train.out_dir {self.out_dir} is in use by {owner}: wait for it to end, stop it, "
                                  f"or choose another train.out_dir") from None
            locked = False  # e.g. ENOLCK: a filesystem without locks; then nobody can tell a live owner
            cli.warning(f"train.out_dir {self.out_dir} cannot be locked ({e.strerror}); nothing stops a second "
                        f"launch on it from writing beside this one")
        before = _read(fd) if locked else ""  # only a lock tells that its writer has ended
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


def claim(out_dir: str, runtime, finished: Callable[[], str | None]) -> tuple[Ownership, str | None]:
    """Rank 0 takes out_dir, then asks finished() (job/resume.py finished_line: whether this launch would only
    repeat a finished run); every rank learns the outcome (a collective).

    Returns (the ownership, finished()'s line or None); raises OutDirError on every rank when out_dir is owned by
    a live launch or unusable, or finished() raised it (a run finished with other settings)."""
    ownership, outcome = Ownership(out_dir), None
    if runtime.is_main:
        try:
            note = ownership.acquire()
            if note:
                cli.warning(note)
            outcome = ("ok", finished())
        except OutDirError as e:
            ownership.release()
            outcome = ("error", str(e))
    box = [outcome]
    dist.broadcast_object_list(box, src=0)  # rank 0 decides: ranks reading files could disagree (NFS caches)
    kind, text = box[0]
    if kind == "error":
        raise OutDirError(text)
    return ownership, text


def _not_finished_record(done: object) -> str | None:
    """What keeps finished.json's content from being the record mark_finished writes (None: nothing)."""
    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if not isinstance(done, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(done), "a number")
        return f"{kind}, not an object"
    if not (isinstance(done.get("config"), dict) and all(isinstance(v, dict) for v in done["config"].values())):
        return "no config of sections"
    epochs = done.get("epochs")
    if not number(done.get("test_acc")) or not (isinstance(epochs, int) and not isinstance(epochs, bool)):
        return "no numeric test_acc and whole epochs"
    if not isinstance(done.get("mlflow_run_id"), (str, type(None))):
        return "an mlflow_run_id that is not a string"
    return None


def prepare(cfg, runtime) -> None:
    """Rank 0 creates out_dir and writes the resolved config there (CONFIG); every rank learns whether that worked."""
    error = None
    if runtime.is_main:
        try:
            Path(cfg.train.out_dir).mkdir(parents=True, exist_ok=True)
            config.dump(cfg, Path(cfg.train.out_dir) / CONFIG)
        except OSError as e:
            error = OutDirError(f"cannot write to train.out_dir {cfg.train.out_dir}: {e.strerror}")
    raise_together(error, runtime.device, OutDirError(f"rank 0 cannot write to train.out_dir {cfg.train.out_dir}"))


def read_finished(out_dir: str) -> dict | None:
    """out_dir's finished.json (None: there is none); OutDirError with one line when it is not a finished run's
    record (unreadable, not JSON, or not the shape mark_finished writes)."""
    path = Path(out_dir) / FINISHED
    try:
        done = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise OutDirError(f"{path} is unreadable ({e}); delete it to run the end of the job again") from None
    problem = _not_finished_record(done)
    if problem:
        raise OutDirError(f"{path} is unreadable (not a finished run's record: {problem}); delete it to run the end "
                          f"of the job again")
    return done


def mark_finished(out_dir: str, record: dict) -> None:
    """Write finished.json atomically and durably (once the run's results, MLflow's included, are complete)."""
    text = json.dumps(record, indent=1) + "\n"
    write_atomically(Path(out_dir) / FINISHED, lambda f: f.write(text.encode()))
