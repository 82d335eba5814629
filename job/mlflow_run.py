"""How records reach the MLflow run of one job: opening (or reopening) the run, the queue of epoch records (held until
a checkpoint that holds them is on disk, then pending until the server accepts them), back-off between tries, one
bounded flush at the end, the final metrics and artifacts, the registered model, and the run's end status.

Which records go to the run is the Tracker's (job/tracking.py): it makes an MlflowRun on rank 0 only, and only when
MLflow is enabled, so MLflow is imported (in open()) there alone. This module prints nothing itself: it says and warns
through the callables it is given. A tracking server that goes away mid-run never stops training: epochs that could
not be sent wait in the queue and go out when it answers again (at the latest in close()).
"""

import time
from collections.abc import Callable
from pathlib import Path

from job import records
from job.config import Config
from job.distributed import Runtime
from job.mlflow_env import fail_fast, password_problem, quick, redact, tracking_uri
from job.provenance import run_tags
from job.store import DISK_FULL, quiet_reports, reason, store_lock


class TrackingError(RuntimeError):
    """MLflow cannot be used at the start of a run that requires it; one line naming the URI."""


TAG_LIMIT = 8000  # MLflow's longest tag value (mlflow.utils.validation.MAX_TAG_VAL_LENGTH)


def extend_history(before: str | None, change: str) -> str:
    """A changed.<key> tag after one more resume's change: every change in order, "; " between them ("0 -> 8 from
    epoch 3; 8 -> 16 from epoch 5"); past MLflow's limit the first stays and the oldest after it go ("...")."""
    value = f"{before}; {change}" if before else change
    if len(value) <= TAG_LIMIT:
        return value
    first = value.split("; ", 1)[0][:TAG_LIMIT // 2]
    tail = value[len(value) - (TAG_LIMIT - len(first) - len("; ...; ")):]
    return f"{first}; ...; {tail.split('; ', 1)[-1]}"


class MlflowRun:
    """The MLflow run of one job, on rank 0: what goes to it is sent in order, and what never got there is in `lost`."""

    def __init__(self, cfg: Config, runtime: Runtime, *, say: Callable[[str], None], warn: Callable[[str], None],
                 stopped: Callable[[], str | None] = lambda: None):
        self.cfg, self.runtime = cfg, runtime
        self.say, self.warn = say, warn  # a line on stdout, a warning on stderr
        self.stopped = stopped  # the stop signal received (its name), if any: the end-of-run flush waits no longer
        self.metrics_path = records.metrics_path(cfg.train.out_dir)
        self.mlflow = None  # the mlflow module, once the run is open
        self.run_id: str | None = None
        self.tags: dict[str, str] = {}  # the run's tags (run_tags and those given to open())
        self.pending: list[dict] = []  # records not yet accepted by the tracking server
        self.held: list[dict] = []  # epoch records that wait for a checkpoint on disk before they go to MLflow
        self.logged: set[int] = set()  # the epochs the reopened MLflow run already holds
        self.offline_warned = False
        self.retry_at, self.backoff_s = 0.0, BACKOFF_S[0]  # after a failed send, no new try before retry_at
        self.flushed = None  # None: not tried; True/False: whether the one bounded end-of-run flush got through
        self.lost: list[str] = []  # what did not reach MLflow (the exit code says so: INCOMPLETE_EXIT_CODE)

    def open(self, history: list[dict], run_id: str | None, tags: dict[str, str], *, system_metrics: bool) -> None:
        """Open the run (or reopen run_id, unless it is gone, finished, deleted or moved) with the config as params
        and these tags besides run_tags, and queue the epochs of history it lacks; TrackingError where MLflow cannot
        be used."""
        fail_fast()
        import mlflow

        quiet_reports()
        self.tags = dict(tags)
        uri = tracking_uri(self.cfg.mlflow.tracking_uri)
        password = password_problem(uri, "MLflow tracking URI")  # $MLFLOW_TRACKING_URI's: the config checked its own
        if password:
            raise TrackingError(password)
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
        run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment.experiment_id,
                               run_name=self.cfg.mlflow.run_name or None, log_system_metrics=system_metrics)
        self.mlflow, self.run_id = mlflow, run.info.run_id
        if run_id is None:
            mlflow.log_params(self.cfg.flat())
        else:  # params are write-once: a resume's changes (resume.Plan.tags) add to the run's changed.<key> tags
            self.tags.update({key: extend_history(found.data.tags.get(key), change)
                              for key, change in self.tags.items() if key.startswith("changed.")})
        self.tags = {**run_tags(self.cfg, self.runtime), **self.tags}  # kept: the registered version carries some
        mlflow.set_tags(self.tags)
        sent = {m.step for m in client.get_metric_history(self.run_id, "train_loss")} if run_id else set()
        self.pending = [r for r in history if r["epoch"] not in sent]  # lost when the server was away
        self.logged = sent
        self._send()
        self.say(f"mlflow: run {self.run_id} in experiment {self.cfg.mlflow.experiment!r} at {redact(uri)}")

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
                with quick():
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
                self.say("mlflow: tracking server is back; queued epochs sent")
                self.offline_warned = False
        return True

    def log_epoch(self, record: records.Epoch, durable: int | None) -> None:
        """An epoch's metrics at step=epoch, once a checkpoint holding it is on disk (durable: the epochs the newest
        one on disk holds; None: send now)."""
        self.held.append(record)
        self.checkpointed(durable)

    def checkpointed(self, durable: int | None) -> None:
        """The newest checkpoint on disk holds the first `durable` epochs (None: all): those held go to MLflow,
        except any the reopened run already has (a resume from an older checkpoint trained them again)."""
        ready = [r for r in self.held if durable is None or r["epoch"] < durable]
        self.held = self.held[len(ready):]  # in epoch order: the ready ones lead
        self.pending += [r for r in ready if r["epoch"] not in self.logged]
        self._send()

    def log_step_metrics(self, metrics: dict, step: int) -> None:
        """Metrics at a step axis: one short try, skipped while the server is backed off; a miss is not retried (the
        epoch records, which are, hold what counts)."""
        if time.monotonic() < self.retry_at:
            return
        try:
            with quick():
                self.mlflow.log_metrics(metrics, step=step)
        except Exception:
            self.retry_at = time.monotonic() + self.backoff_s  # the next epoch record warns, retries and backs off

    def log_final(self, record: records.Final, artifacts: list[Path], profile: Path) -> None:
        """The closing record's metrics, the artifacts and the profile folder (if there is one), after the queued
        epochs (a bounded wait for an absent server)."""
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
                      f"they are in {Path(self.cfg.train.out_dir)}")
            self.lost.append("the final metrics and artifacts")

    def _flush(self) -> bool:
        """Send the queued epochs, retrying for at most mlflow.flush_timeout_s, once per run (a second call
        returns the first's answer); a stop signal ends the wait at once."""
        if self.flushed is not None:
            return self.flushed and self._send(now=True)
        deadline = time.monotonic() + self.cfg.mlflow.flush_timeout_s
        while not self._send(now=True):
            stopped = self.stopped()
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
        """Log the model to the run, register it with the data's fingerprint, and move @champion or @challenger
        (job/registry.py); not while epochs are still queued."""
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
        self.say(line)

    def close(self, status: str) -> None:
        """End the run: FINISHED, FAILED, or KILLED (stopped early; a resume reopens it as RUNNING)."""
        if not self.mlflow.active_run():
            return
        if self.pending:  # a bounded wait for a finished run; one try for a stopped or failed one
            self._flush() if status == "FINISHED" else self._send(now=True)
        if status == "FINISHED" and self.lost:  # a FINISHED run is final, and the next launch would start another:
            status = "FAILED"  # this one stays open to it, which ends it again (the registered model, say)
        try:
            with quick():
                self.mlflow.end_run(status=status)
        except Exception as e:
            self.warn(f"MLflow: could not mark run {self.run_id} {status} ({reason(e)})")
            self.lost.append(f"the run's {status} status")


BACKOFF_S = (10.0, 300.0)  # first and longest pause between tries after a failed send
