"""Rank 0's side effects in one place: progress lines on stdout, metrics.jsonl, and the MLflow run.

Every rank holds a Tracker; on ranks other than 0 each method does nothing (open() still takes part in
one collective), so the training loop never asks which rank it is on. MLflow is imported lazily, on
rank 0 only, and only when enabled. A tracking server that goes away mid-run never stops training:
epochs that could not be sent wait in a queue and go out when it answers again (at the latest in close()).
"""

import contextlib
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

from job import cli
from job.checkpoint import CheckpointError
from job.clock import StepClock
from job.config import Config, redact
from job.distributed import Runtime, all_agree
from job.provenance import run_tags
from job.store import DISK_FULL, quiet_reports, reason, store_lock

DEFAULT_STORE = "mlflow.db"


class TrackingError(RuntimeError):
    """MLflow cannot be used at the start of a run that requires it; one line naming the URI."""


def tracking_uri(configured: str) -> str:
    """mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else a sqlite file in the working directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_STORE}"


# MLflow's HTTP settings the user set in the environment before this job started: ours never override them
USER_SET = {k for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT") if k in os.environ}


def fail_fast() -> None:
    """Unless the user set them: few HTTP retries, so that an absent server costs seconds, not minutes,
    while every rank waits (MLflow's own defaults retry for minutes)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{'train': {'lr': 0.1}} -> {'train.lr': 0.1}"""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Tracker:
    """Progress lines, metrics.jsonl and the MLflow run of one job; inert on ranks other than 0."""

    def __init__(self, cfg: Config, runtime: Runtime):
        self.cfg = cfg
        self.runtime = runtime
        self.active = runtime.is_main
        self.metrics_path = Path(cfg.train.out_dir) / "metrics.jsonl"
        self.mlflow = None  # the mlflow module, once a run is open
        self.run_id: str | None = None
        self.tags: dict[str, str] = {}  # the run's tags (run_tags), set when the run opens
        self.pending: list[dict] = []  # records not yet accepted by the tracking server
        self.held: list[dict] = []  # epoch records that wait for a checkpoint on disk before they go to MLflow
        self.logged: set[int] = set()  # the epochs the reopened MLflow run already holds
        self.offline_warned = False
        self.retry_at, self.backoff_s = 0.0, BACKOFF_S[0]  # after a failed send, no new try before retry_at
        self.flushed = None  # None: not tried; True/False: whether the one bounded end-of-run flush got through
        self.lost: list[str] = []  # what did not reach MLflow (the exit code says so: INCOMPLETE_EXIT_CODE)
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

    def progress(self, iterable, total: int, desc: str):
        """A tqdm bar around iterable on rank 0 when stdout is a terminal; the iterable itself otherwise."""
        if not (self.active and sys.stdout.isatty()):
            return iterable
        try:
            from tqdm import tqdm
        except ImportError:  # optional: a bar is for a person watching, training does not need it
            return iterable
        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)

    def step_clock(self) -> StepClock:
        """A clock for one epoch's steps; inert unless train.step_times and rank 0."""
        return StepClock(self.runtime.device, self.active and self.cfg.train.step_times)

    def log_steps(self, epoch: int, first_step: int, clock: StepClock) -> None:
        """One steps.jsonl line per step: epoch, step, seconds; the launch's first step adds since_launch_s."""
        if not clock.enabled:
            return
        lines = []
        for i, seconds in enumerate(clock.durations()):
            record = {"epoch": epoch, "step": first_step + i, "step_s": seconds}
            if i == 0 and clock.since_launch_s is not None:
                record["since_launch_s"] = clock.since_launch_s
            lines.append(json.dumps(record) + "\n")
        with open(self.metrics_path.with_name("steps.jsonl"), "a") as f:
            f.writelines(lines)

    # ---- the run --------------------------------------------------------------------------------------
    def open(self, history: list[dict], run_id: str | None) -> str | None:
        """Rewrite metrics.jsonl from the checkpoint's history and open (or reopen) the MLflow run.

        Every rank calls it: if rank 0 cannot reach a required tracking server, all ranks raise.
        Returns the run id (None without MLflow).
        """
        error = None
        if self.active:
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))
            if self.cfg.mlflow.enabled:
                try:
                    self._open_mlflow(history, run_id)
                except TrackingError as e:
                    if self.cfg.mlflow.required:
                        error = e
                    else:
                        self.warn(f"{e}; training without MLflow (mlflow.required=false), metrics.jsonl only")
        if not all_agree(error is None, self.runtime.device):
            raise error or TrackingError("rank 0 could not reach MLflow (its log has the reason)")
        return self.run_id

    def _open_mlflow(self, history: list[dict], run_id: str | None) -> None:
        fail_fast()
        import mlflow

        quiet_reports()
        uri = tracking_uri(self.cfg.mlflow.tracking_uri)
        if redact(uri) != uri:
            raise TrackingError(f"MLflow tracking URI {redact(uri)} holds a password: set MLFLOW_TRACKING_USERNAME "
                                f"and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead")
        try:
            mlflow.set_tracking_uri(uri)
            with store_lock(uri):  # this first use creates (or migrates) a new sqlite store
                client = mlflow.MlflowClient()
                client.search_experiments(max_results=1)
        except Exception as e:
            raise TrackingError(f"MLflow tracking URI {redact(uri)} cannot be used: {reason(e)}") from None
        # its id, passed on explicitly: when two jobs create the experiment at once, MLflow's set_experiment
        # returns it from the losing side without making it active, and start_run would use "Default"
        name = self.cfg.mlflow.experiment
        try:
            experiment = mlflow.set_experiment(name)
        except Exception as e:  # deleted (MLflow keeps the name until it is purged), or refused
            raise TrackingError(f"MLflow experiment {name!r} cannot be used: {reason(e)} (restore it, or choose "
                                f"another mlflow.experiment)") from None
        if run_id is not None:
            try:
                found = client.get_run(run_id)
            except Exception:
                self.warn(f"MLflow run {run_id} of the checkpoint is not at {redact(uri)}; starting a new run")
                self.tags["continues_run"], run_id = run_id, None
            else:
                why = ("has FINISHED" if found.info.status == "FINISHED"  # a finished run's record is final
                       else "was deleted" if found.info.lifecycle_stage == "deleted"
                       else "is in another experiment (renamed?)"
                       if found.info.experiment_id != experiment.experiment_id
                       else None)
                if why:
                    self.warn(f"MLflow run {run_id} of the checkpoint {why}; starting a new run")
                    self.tags["continues_run"], run_id = run_id, None
        system_metrics = _has_module("psutil")
        run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment.experiment_id,
                               run_name=self.cfg.mlflow.run_name or None, log_system_metrics=system_metrics)
        self.mlflow, self.run_id = mlflow, run.info.run_id
        if run_id is None:
            mlflow.log_params(flatten(self.cfg.to_dict()))
        self.tags = {**run_tags(self.cfg, self.runtime), **self.tags}  # kept: the registered version carries some
        mlflow.set_tags(self.tags)
        sent = {m.step for m in client.get_metric_history(self.run_id, "train_loss")} if run_id else set()
        self.pending = [r for r in history if r["epoch"] not in sent]  # lost when the server was away
        self.logged = sent
        self._send()
        self.info(f"mlflow: run {self.run_id} in experiment {self.cfg.mlflow.experiment!r} at {redact(uri)}")

    def _send(self, now: bool = False) -> bool:
        """Send queued epoch records in order; on failure keep them, warn once, and carry on.

        During training each try is one short request (QUICK: no retries, a 5 s timeout) and a failure backs off
        (BACKOFF_S) before the next, so a gone or hung server costs an epoch at most one short wait; now=True
        (the end-of-run flush) tries regardless of the back-off."""
        if self.pending and not now and time.monotonic() < self.retry_at:
            return False
        while self.pending:
            record = self.pending[0]
            metrics = {k: v for k, v in record.items() if k != "epoch" and v is not None}
            try:
                with _environ(QUICK):
                    self.mlflow.log_metrics(metrics, step=record["epoch"])
            except Exception as e:
                if not self.offline_warned:
                    why = reason(e)
                    self.warn("MLflow store cannot be written (disk full); training goes on, metrics.jsonl keeps "
                              "every epoch, and they are sent when it can be written again" if why == DISK_FULL else
                              f"MLflow unreachable ({why}); training goes on, metrics.jsonl keeps every epoch, and "
                              f"they are sent when the server is back")
                    self.offline_warned = True
                self.retry_at = time.monotonic() + self.backoff_s
                self.backoff_s = min(self.backoff_s * 2, BACKOFF_S[1])
                return False
            self.pending.pop(0)
            self.backoff_s = BACKOFF_S[0]
            if self.offline_warned:
                self.info("mlflow: tracking server is back; queued epochs sent")
                self.offline_warned = False
        return True

    def log_epoch(self, record: dict, epochs: int, eta_s: float, durable: int | None = None) -> None:
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
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.mlflow:
            self.held.append(record)
            self.checkpointed(durable)

    def checkpointed(self, durable: int | None) -> None:
        """The newest checkpoint on disk holds the first `durable` epochs (None: all): those held go to MLflow,
        except any the reopened run already has (a resume from an older checkpoint trained them again)."""
        if not self.mlflow:
            return
        ready = [r for r in self.held if durable is None or r["epoch"] < durable]
        self.held = self.held[len(ready):]  # in epoch order: the ready ones lead
        self.pending += [r for r in ready if r["epoch"] not in self.logged]
        self._send()

    def log_step_metrics(self, metrics: dict, step: int) -> None:
        """Metrics at a step axis (mlflow.log_every_steps): one short try, skipped while the server is backed
        off; a miss is not retried (the epoch records, which are, hold what counts)."""
        if not self.mlflow or time.monotonic() < self.retry_at:
            return
        try:
            with _environ(QUICK):
                self.mlflow.log_metrics(metrics, step=step)
        except Exception:
            self.retry_at = time.monotonic() + self.backoff_s  # the next epoch record warns, retries and backs off

    def log_final(self, record: dict, history: list[dict], confusion: torch.Tensor, checkpoint: Path) -> None:
        """The closing record (test accuracy), its figures and files; waits for an absent server, bounded."""
        if not self.active:
            return
        from job import plots
        from job.data import CLASSES

        self.info("final  " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in record.items()))
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        out = Path(self.cfg.train.out_dir)
        try:
            figures = [plots.learning_curves(history, out / "learning_curves.png"),
                       plots.confusion_matrix(confusion, CLASSES, out / "confusion_matrix.png")]
        except OSError as e:  # a full disk fails here as it does for a checkpoint: one line
            raise CheckpointError(f"cannot write the figures in {out}: {e.strerror or e}; the checkpoints and "
                                  f"metrics.jsonl are intact") from None
        except ImportError as e:  # matplotlib is optional (a GPU image with torch alone): the records hold it all
            self.warn(f"no figures: {e.name or 'matplotlib'} is not installed (pip install matplotlib)")
            figures = []
        artifacts = [out / "config.yaml", self.metrics_path, *figures, checkpoint]
        profile = out / "profile"  # train.profile's traces and op tables, every rank's on a shared out_dir
        if not self.mlflow:
            return
        if not self._flush():
            self.lost.append("the final metrics and artifacts")
            return
        try:
            # only what the run lacks: a relaunch after a kill at the end (registration, say) must not log test_acc
            # twice; artifacts are files at fixed paths, logged again as they are
            logged = self.mlflow.get_run(self.run_id).data.metrics
            metrics = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in logged}
            if metrics:
                self.mlflow.log_metrics(metrics)
            for path in artifacts:
                self.mlflow.log_artifact(str(path))
            if profile.is_dir():
                self.mlflow.log_artifacts(str(profile), artifact_path="profile")
        except Exception as e:
            self.warn(f"MLflow: could not log the final metrics and artifacts ({reason(e)}); "
                      f"they are in {out}")
            self.lost.append("the final metrics and artifacts")

    def _flush(self) -> bool:
        """Send the queued epochs, retrying for at most mlflow.flush_timeout_s, once per run (a second call
        returns the first's answer); a stop signal ends the wait at once."""
        if self.flushed is not None:
            return self.flushed and self._send(now=True)
        deadline = time.monotonic() + self.cfg.mlflow.flush_timeout_s
        while not self._send(now=True):
            stopped = self.stop is not None and self.stop.received
            if stopped or time.monotonic() > deadline:
                why = (f"{stopped} received" if stopped
                       else f"still unreachable after {self.cfg.mlflow.flush_timeout_s}s")
                self.warn(f"MLflow {why}: {len(self.pending)} epoch(s) not sent; they are in {self.metrics_path}")
                self.lost.append(f"{len(self.pending)} epoch(s)")
                self.flushed = False
                return False
            time.sleep(1)
        self.flushed = True
        return True

    def register(self, weights: dict, splits, val_acc: float | None, test_acc: float) -> None:
        """Log the model (best.pt's weights to predict with) to the run, register it with the data's fingerprint,
        and move @champion or @challenger (job/registry.py). Nothing (not even the fingerprint) without MLflow."""
        if not (self.active and self.mlflow):
            return
        if self.pending:
            self.lost.append("the registered model")
            return
        from job import registry
        from job.data import fingerprint

        try:
            line = registry.log_and_register(self.mlflow, weights, splits.test_x[:4], cfg=self.cfg, run_id=self.run_id,
                                             val_acc=val_acc, test_acc=test_acc,
                                             tags={"git_commit": self.tags.get("git_commit", "unknown"),
                                                   "config_hash": self.tags["config_hash"],
                                                   "data_fingerprint": fingerprint(splits)})
        except Exception as e:
            self.warn(f"MLflow: registering the model failed ({reason(e)}); best.pt is in {self.cfg.train.out_dir}")
            self.lost.append("the registered model")
            return
        self.info(line)

    def close(self, status: str) -> None:
        """End the MLflow run: FINISHED, FAILED, or KILLED (stopped early; a resume reopens it as RUNNING)."""
        if not (self.active and self.mlflow and self.mlflow.active_run()):
            return
        if self.pending:  # a bounded wait for a finished run; one try for a stopped or failed one
            self._flush() if status == "FINISHED" else self._send(now=True)
        if status == "FINISHED" and self.lost:  # a FINISHED run is final, and the next launch would start another:
            status = "FAILED"  # this one stays open to it, which ends it again (the registered model, say)
        try:
            with _environ(QUICK):
                self.mlflow.end_run(status=status)
        except Exception as e:
            self.warn(f"MLflow: could not mark run {self.run_id} {status} ({reason(e)})")
            self.lost.append(f"the run's {status} status")

    @property
    def complete(self) -> bool:
        """Whether everything this job meant to log reached MLflow (true without MLflow)."""
        return not self.lost


# During training, MLflow's own waits (7 retries with back-off, 120 s timeouts: minutes per call against a hung
# server) are replaced by one short try; Tracker backs off between tries instead.
QUICK = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
BACKOFF_S = (10.0, 300.0)  # first and longest pause between tries after a failed send
# The exit code of a job that trained and saved everything but could not log all of it to MLflow
# (metrics.jsonl and the checkpoints have it): not 0, so that nobody believes the registry is up to date.
INCOMPLETE_EXIT_CODE = 3


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """Set MLflow's HTTP settings for a block (the user's own, USER_SET, win; fail_fast's do not)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if k not in USER_SET})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
