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
