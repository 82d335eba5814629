"""Rank 0's side effects in one place: progress lines on stdout, metrics.jsonl, and MLflow.

Every rank holds a Tracker; on ranks other than 0 each method does nothing, so the training loop
never asks which rank it is on. MLflow is imported lazily, on rank 0 only, and only when enabled.
"""

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from job.config import Config
from job.distributed import Runtime

DEFAULT_STORE = "mlflow.db"


def tracking_uri(configured: str) -> str:
    """mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else a sqlite file in the working directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_STORE}"


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{'train': {'lr': 0.1}} -> {'train.lr': 0.1}"""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def git_commit() -> tuple[str, bool] | None:
    """(commit, dirty) of the source tree this job runs from, or None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit, bool(dirty)


class Tracker:
    """Progress lines, metrics.jsonl and the MLflow run of one job; inert on ranks other than 0."""

    def __init__(self, cfg: Config, runtime: Runtime):
        self.cfg = cfg
        self.runtime = runtime
        self.active = runtime.is_main
        self.metrics_path = Path(cfg.train.out_dir) / "metrics.jsonl"
        self.mlflow = None
        self.run_id: str | None = None

    def info(self, message: str) -> None:
        """A line on stdout from rank 0."""
        if self.active:
            print(message, flush=True)

    def progress(self, iterable, total: int, desc: str):
        """A tqdm bar around iterable on rank 0 when stdout is a terminal; the iterable itself otherwise."""
        if not (self.active and sys.stdout.isatty()):
            return iterable
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)

    def start(self, start_epoch: int, run_id: str | None) -> str | None:
        """Open (or reopen, after a resume) the MLflow run; drop metrics.jsonl lines of epochs to be redone."""
        if not self.active:
            return None
        self._truncate_metrics(start_epoch)
        if not self.cfg.mlflow.enabled:
            return None
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri(self.cfg.mlflow.tracking_uri))
        mlflow.set_experiment(self.cfg.mlflow.experiment)
        run = mlflow.start_run(run_id=run_id, run_name=self.cfg.mlflow.run_name or None)
        self.run_id = run.info.run_id
        if run_id is None:
            mlflow.log_params(flatten(self.cfg.to_dict()))
        mlflow.set_tags(self._tags())
        self.info(f"mlflow: run {self.run_id} in experiment {self.cfg.mlflow.experiment!r} at "
                  f"{mlflow.get_tracking_uri()}")
        return self.run_id

    def _tags(self) -> dict[str, str]:
        rt = self.runtime
        tags = {"torch": torch.__version__, "cuda": str(torch.version.cuda), "world_size": str(rt.world_size),
                "nodes": str(rt.num_nodes), "device": self._device_name()}
        commit = git_commit()
        if commit:
            tags["git_commit"], tags["git_dirty"] = commit[0], str(commit[1]).lower()
        for env, tag in (("SLURM_JOB_ID", "slurm_job_id"), ("HOSTNAME", "host"), ("KUBERNETES_POD_NAME", "k8s_pod")):
            if os.environ.get(env):
                tags[tag] = os.environ[env]
        return tags

    def _device_name(self) -> str:
        device = self.runtime.device
        return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    def _truncate_metrics(self, start_epoch: int) -> None:
        if not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("epoch", start_epoch) < start_epoch]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def _append(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def log_epoch(self, record: dict, epochs: int, eta_s: float) -> None:
        """One epoch: a progress line, a metrics.jsonl line, and MLflow metrics at step=epoch."""
        if not self.active:
            return
        val = "-" if record["val_acc"] is None else f"{record['val_acc']:.4f}"
        eta = datetime.timedelta(seconds=round(eta_s))
        self.info(f"epoch {record['epoch'] + 1}/{epochs}  loss {record['train_loss']:.4f}  "
                  f"train_acc {record['train_acc']:.4f}  val_acc {val}  lr {record['lr']:.4g}  "
                  f"{record['images_per_sec']:.0f} img/s  {record['epoch_time_s']:.1f}s  ETA {eta}")
        self._append(record)
        if self.mlflow:
            metrics = {k: v for k, v in record.items() if k != "epoch" and v is not None}
            self.mlflow.log_metrics(metrics, step=record["epoch"])

    def log_final(self, record: dict) -> None:
        """The closing record (test accuracy): a line, metrics.jsonl, MLflow."""
        if not self.active:
            return
        self.info("final  " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in record.items()))
        self._append(record)
        if self.mlflow:
            self.mlflow.log_metrics({k: v for k, v in record.items() if isinstance(v, (int, float))})

    def log_artifact(self, path: Path) -> None:
        """Attach a file to the MLflow run."""
        if self.active and self.mlflow:
            self.mlflow.log_artifact(str(path))

    def finish(self, status: str) -> None:
        """Close the MLflow run: FINISHED, FAILED, or KILLED (stopped early; a resume reopens it)."""
        if self.active and self.mlflow and self.mlflow.active_run():
            self.mlflow.end_run(status=status)
