"""Shared helpers: run the job as a user would (a subprocess) and read what it wrote."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tiny, fast settings used by the end-to-end tests (width 8, a few hundred synthetic images).
TINY = ["model.width=8", "data.source=synthetic", "data.val_size=256", "data.train_subset=1024",
        "data.test_subset=512", "train.batch_size=64", "train.lr=0.05", "train.ref_batch_size=64",
        "train.warmup_epochs=0.5", "train.eval_batch_size=256", "mlflow.enabled=false"]


def job_env(**extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def run_job(args: list[str], nproc: int = 0, cwd: Path = ROOT, timeout: int = 300, env: dict | None = None,
            module: str = "job.train") -> subprocess.CompletedProcess:
    """`python -m job.train args` (nproc=0) or `torchrun --standalone --nproc_per_node=nproc -m job.train args`."""
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=cwd, env=env or job_env(), capture_output=True, text=True, timeout=timeout)


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a sqlite store and served artifacts under a temp dir."""

    def __init__(self, root: Path, port: int | None = None):
        self.root, self.port = root, port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 90) -> "MlflowServer":
        import time
        import urllib.request

        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--serve-artifacts", "--artifacts-destination", str(self.root / "artifacts")]
        self.log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer within {timeout}s")

    def stop(self) -> None:
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def client(self):
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (torchrun's workers live in their own process groups)."""
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [parent, *parent.children(recursive=True)]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


TIME_KEYS = {"images_per_sec", "epoch_time_s"}  # metrics.jsonl fields that differ between equal runs


def load_ckpt(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def faulty_save_env(tmp_path: Path, on_second_save: str) -> dict:
    """job_env() whose torch.save runs on_second_save (Python lines, `f` is the open file) instead of
    writing the second last.pt: a sitecustomize on PYTHONPATH simulates a disk or node failing mid-save."""
    site = tmp_path / "site"
    site.mkdir()
    body = "".join(f"            {line}\n" for line in on_second_save.splitlines())
    (site / "sitecustomize.py").write_text(
        "import errno, os, time, torch\n"
        "_save, _calls = torch.save, []\n"
        "def save(obj, f, *a, **k):\n"
        "    if 'last.pt' in str(getattr(f, 'name', f)):\n"
        "        _calls.append(1)\n"
        "        if len(_calls) == 2:\n"
        + body +
        "    return _save(obj, f, *a, **k)\n"
        "torch.save = save\n")
    return job_env(PYTHONPATH=f"{site}{os.pathsep}{ROOT}")
