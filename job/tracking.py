"""Rank 0's records and where each goes: progress lines on stdout, metrics.jsonl, the figures, and the MLflow run.

Every rank holds a Tracker; on ranks other than 0 each method does nothing (open() still takes part in
one collective), so the training loop never asks which rank it is on. How records reach MLflow (the run, its
outage queue and back-off, registration) is job/mlflow_run.py's MlflowRun, which the Tracker makes on rank 0 only,
and only when MLflow is enabled: MLflow is imported there alone.
"""

import datetime
from pathlib import Path

import torch

from job import cli, outdir, records
from job.checkpoint import CheckpointError
from job.config import Config
from job.distributed import Runtime, raise_together
from job.mlflow_env import has_module
from job.mlflow_run import MlflowRun, TrackingError


class Tracker:
    """Progress lines, metrics.jsonl, figures and the MLflow run of one job; inert on ranks other than 0."""

    def __init__(self, cfg: Config, runtime: Runtime):
        self.cfg = cfg
        self.runtime = runtime
        self.active = runtime.is_main
        self.metrics_path = records.metrics_path(cfg.train.out_dir)
        self.run: MlflowRun | None = None  # the MLflow run, once open (rank 0, MLflow enabled and usable)
        self.tags: dict[str, str] = {}  # the MLflow run's tags: extra ones before open(), all of them (run_tags) after
        self.stop = None  # the StopSignal: waits end early when a stop signal arrives

    # ---- console ------------------------------------------------------------------------------------
    def info(self, message: str) -> None:
        """A line on stdout from rank 0."""
        if self.active:
            print(message, flush=True)

    def warn(self, message: str) -> None:
        """A warning line on stderr from rank 0."""
        if self.active:
            cli.warning(message)

    # ---- the run --------------------------------------------------------------------------------------
    def open(self, history: list[dict], run_id: str | None) -> str | None:
        """Rewrite metrics.jsonl from the checkpoint's history and open (or reopen) the MLflow run.

        Every rank calls it: if rank 0 cannot reach a required tracking server, all ranks raise.
        Returns the run id (None without MLflow).
        """
        error = None
        if self.active:
            records.rewrite(self.metrics_path, history)
            if self.cfg.mlflow.enabled:
                try:
                    self._open_mlflow(history, run_id)
                except TrackingError as e:
                    if self.cfg.mlflow.required:
                        error = e
                    else:
                        self.warn(f"{e}; training without MLflow (mlflow.required=false), metrics.jsonl only")
        raise_together(error, self.runtime.device,
                       TrackingError("rank 0 could not reach MLflow (its log has the reason)"))
        return self.run_id

    def _open_mlflow(self, history: list[dict], run_id: str | None) -> None:
        """Open the MLflow run (TrackingError where it cannot be used); system metrics go to it where psutil can
        measure them."""
        run = self._new_run()
        run.open(history, run_id, self.tags, system_metrics=has_module("psutil"))
        self.run, self.tags = run, run.tags

    def _new_run(self) -> MlflowRun:
        """An MlflowRun that speaks through this console and ends its end-of-run wait on a stop signal."""
        return MlflowRun(self.cfg, self.runtime, say=self.info, warn=self.warn,
                         stopped=lambda: self.stop.received if self.stop is not None else None)

    @property
    def run_id(self) -> str | None:
        """The MLflow run's id (None without MLflow)."""
        return self.run.run_id if self.run else None

    @property
    def sends_to_mlflow(self) -> bool:
        """Whether records go to an MLflow run (rank 0, with the run open)."""
        return self.run is not None

    def log_epoch(self, record: records.Epoch, epochs: int, eta_s: float, durable: int | None = None) -> None:
        """One epoch: a progress line, a metrics.jsonl line, and MLflow metrics at step=epoch once a checkpoint
        holding it is on disk (durable: the epochs the newest one on disk holds; None: send now), since a resume
        trains again, and would log again, an epoch that no checkpoint holds (checkpointed() sends the rest)."""
        if not self.active:
            return
        val = "-" if record["val_acc"] is None else f"{record['val_acc']:.4f}"
        eta = datetime.timedelta(seconds=round(eta_s))
        self.info(f"epoch {record['epoch'] + 1}/{epochs}  loss {record['train_loss']:.4f}  "
                  f"train_acc {record['train_acc']:.4f}  val_acc {val}  lr {record['lr']:.4g}  "
                  f"{record['images_per_sec']:.0f} img/s  {record['epoch_time_s']:.1f}s  ETA {eta}")
        records.append(self.metrics_path, [record])
        if self.run:
            self.run.log_epoch(record, durable)

    def checkpointed(self, durable: int | None) -> None:
        """The newest checkpoint on disk holds the first `durable` epochs (None: all): those held go to MLflow,
        except any the reopened run already has (a resume from an older checkpoint trained them again)."""
        if self.run:
            self.run.checkpointed(durable)

    def log_step_metrics(self, metrics: dict, step: int) -> None:
        """Metrics at a step axis (mlflow.log_every_steps): one short try, skipped while the server is backed
        off; a miss is not retried (the epoch records, which are, hold what counts)."""
        if self.run:
            self.run.log_step_metrics(metrics, step)

    def log_final(self, record: records.Final, history: list[dict], confusion: torch.Tensor, checkpoint: Path) -> None:
        """The closing record (test accuracy), its figures and files; waits for an absent server, bounded."""
        if not self.active:
            return
        from job import plots
        from job.data import CLASSES

        self.info("final  " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in record.items()))
        records.append(self.metrics_path, [record])
        out = Path(self.cfg.train.out_dir)
        try:
            figures = [plots.learning_curves(history, out / outdir.LEARNING_CURVES),
                       plots.confusion_matrix(confusion, CLASSES, out / outdir.CONFUSION_MATRIX)]
        except OSError as e:  # a full disk fails here as it does for a checkpoint: one line
            raise CheckpointError(f"cannot write the figures in {out}: {e.strerror or e}; the checkpoints and "
                                  f"metrics.jsonl are intact") from None
        except ImportError as e:  # matplotlib is optional (a GPU image with torch alone): the records hold it all
            self.warn(f"no figures: {e.name or 'matplotlib'} is not installed (pip install matplotlib)")
            figures = []
        artifacts = [out / outdir.CONFIG, self.metrics_path, *figures, checkpoint]
        profile = out / outdir.PROFILE  # train.profile's traces and op tables, every rank's on a shared out_dir
        if self.run:
            self.run.log_final(record, artifacts, profile)

    def register(self, weights: dict, splits, val_acc: float | None, test_acc: float) -> None:
        """Log the model (best.pt's weights to predict with) to the run, register it with the data's fingerprint,
        and move @champion or @challenger (job/registry.py). Nothing (not even the fingerprint) without MLflow."""
        if self.run:
            self.run.register(weights, splits, val_acc, test_acc)

    def close(self, status: str) -> None:
        """End the MLflow run: FINISHED, FAILED, or KILLED (stopped early; a resume reopens it as RUNNING)."""
        if self.run:
            self.run.close(status)

    @property
    def lost(self) -> list[str]:
        """What did not reach MLflow (empty without MLflow)."""
        return self.run.lost if self.run else []

    @property
    def complete(self) -> bool:
        """Whether everything this job meant to log reached MLflow (true without MLflow)."""
        return not self.lost


# The exit code of a job that trained and saved everything but could not log all of it to MLflow
# (metrics.jsonl and the checkpoints have it): not 0, so that nobody believes the registry is up to date.
INCOMPLETE_EXIT_CODE = 3
