"""Running one measurement as a child process: its environment, its peak RSS (wait4), a timed marker file."""

import os
import subprocess
import time
from dataclasses import dataclass
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


def run_child(cmd: list[str], env: dict, log_path: Path, timeout_s: float, watch: Path | None = None) -> Child:
    """Run cmd in its own session, output to log_path; wait4() gives its peak RSS (the largest of it and its
    descendants, e.g. torchrun's workers). `watch` is a file whose appearance is timed from the launch."""
    with open(log_path, "wb") as log:
        tic = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        watch_s, timed_out = None, False
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
                    kill_tree(proc.pid, wait=False)
                    _, status, usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.01)
        except BaseException:  # Ctrl-C: the child has its own session, so it would not hear it
            kill_tree(proc.pid, wait=False)
            proc.wait()
            raise
        wall_s = time.perf_counter() - tic
    proc.returncode = 124 if timed_out else os.waitstatus_to_exitcode(status)
    return Child(proc.returncode, wall_s, usage.ru_maxrss / 1024, watch_s, log_path.read_text(errors="replace"))


def kill_tree(pid: int, wait: bool = True) -> None:
    """SIGKILL a process and every descendant (torchrun's workers live in their own process groups); wait for
    them to go, unless the caller reaps pid itself (wait=False)."""
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if wait:
        psutil.wait_procs(procs, timeout=30)
