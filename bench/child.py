"""Running one measurement as a child process: its environment, its peak RSS (wait4), a timed marker file."""

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import ROOT


def child_env(threads: int | None, cache_dir: Path) -> dict:
    """The caller's environment, this checkout importable, OMP_NUM_THREADS when given, and a fresh
    TorchInductor cache (every compile is a cold one, as on a fresh node)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("MLFLOW_TRACKING_URI", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


@dataclass
class Child:
    """How one child process went: exit status, wall time, peak RSS, and when `watch` first existed."""

    returncode: int
    wall_s: float
    peak_rss_mib: float
    watch_s: float | None
    log: str
    killed: list[dict] = field(default_factory=list)
    """The processes killed when it overran (kill_tree's record); [] when it ended by itself."""


def run_child(cmd: list[str], env: dict, log_path: Path, timeout_s: float, watch: Path | None = None) -> Child:
    """Run cmd in its own session, output to log_path; wait4() gives its peak RSS (the largest of it and its
    descendants, e.g. torchrun's workers). `watch` is a file whose appearance is timed from the launch."""
    with open(log_path, "wb") as log:
        tic = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        watch_s, timed_out, killed = None, False, []
        try:
            while True:
                elapsed = time.perf_counter() - tic
                if watch_s is None and watch is not None and watch.exists():
                    watch_s = elapsed
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if elapsed > timeout_s:
                    timed_out = True
                    killed = kill_tree(proc.pid, wait=False)
                    _, status, usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.01)
        except BaseException:  # Ctrl-C: the child has its own session, so it would not hear it
            kill_tree(proc.pid, wait=False)
            proc.wait()
            raise
        wall_s = time.perf_counter() - tic
    proc.returncode = 124 if timed_out else os.waitstatus_to_exitcode(status)
    return Child(proc.returncode, wall_s, usage.ru_maxrss / 1024, watch_s, log_path.read_text(errors="replace"),
                 killed)


def kill_tree(pid: int, wait: bool = True) -> list[dict]:
    """SIGKILL a process, every descendant (torchrun's workers, bench workers and pytest's jobs start sessions of
    their own) and every process group among them (a member orphaned before the walk goes too, unless it is the
    caller's own group); wait for them to go, unless the caller reaps pid itself (wait=False). Returns what it
    found: pid, process group, session and command line of each."""
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    found = []
    for p in procs:
        try:
            found.append({"pid": p.pid, "pgid": os.getpgid(p.pid), "sid": os.getsid(p.pid),
                          "cmd": " ".join(p.cmdline())[:160]})
        except (psutil.Error, ProcessLookupError):  # gone already, or a zombie
            pass
    for pgid in {f["pgid"] for f in found} - {os.getpgrp()}:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if wait:
        psutil.wait_procs(procs, timeout=30)
    return found
