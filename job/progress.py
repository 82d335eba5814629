"""Progress inside an epoch, for logs that are files (batch schedulers, where tqdm is off) and for MLflow.

Rank 0 prints `epoch 3/200  step 40/88  loss 1.234  acc 0.562  4210 img/s  ETA 1:02:03` every
train.log_every_steps steps or train.log_every_s seconds, and logs the same at a step axis every
mlflow.log_every_steps steps. The running loss and accuracy are rank 0's device sums over the epoch so far;
reading them is a host sync, so it happens only at those points, never per step. Rates are measured from the
epoch's (or the launch's) first step to the point, then from point to point.
"""

import datetime
import sys
import time

import torch

from job.config import Config
from job.distributed import Runtime
from job.loop import TrainState
from job.tracking import Tracker


class Progress:
    """The per-step hook (job/steps.py's StepEnd calls it); build() returns None when nothing is asked, so the loop
    then pays nothing."""

    def __init__(self, cfg: Config, tracker: Tracker, *, lines: bool, mlflow_every: int):
        t = cfg.train
        self.tracker, self.epochs, self.batch = tracker, t.epochs, t.batch_size
        self.every_s = t.log_every_s if lines else 0.0
        self.every_steps = t.log_every_steps if lines else 0
        self.mlflow_every = mlflow_every
        self.previous = None  # the step of the last call: a smaller one starts an epoch
        self.line_from = self.mlflow_from = (0.0, 0)  # (time, step) the next rate is measured from

    @staticmethod
    def build(cfg: Config, runtime: Runtime, tracker: Tracker) -> "Progress | None":
        t = cfg.train
        lines = runtime.is_main and not sys.stdout.isatty() and bool(t.log_every_s or t.log_every_steps)
        mlflow_every = cfg.mlflow.log_every_steps if runtime.is_main and tracker.sends_to_mlflow else 0
        return Progress(cfg, tracker, lines=lines, mlflow_every=mlflow_every) if lines or mlflow_every else None

    def __call__(self, state: TrainState, step: int, steps: int, sums: torch.Tensor) -> None:
        now = time.monotonic()
        first = self.previous is None or step <= self.previous
        self.previous = step
        if first:  # no interval yet to measure a rate over
            self.line_from = self.mlflow_from = (now, step)
        global_step = state.epoch * steps + step
        line_due = not first and ((self.every_steps and step % self.every_steps == 0)
                                  or (self.every_s and now - self.line_from[0] >= self.every_s))
        mlflow_due = self.mlflow_every and global_step % self.mlflow_every == 0
        if not (line_due or mlflow_due):
            return
        loss_sum, correct, count = sums.tolist()
        now = time.monotonic()  # after the sync: the device has done the steps being counted
        loss, acc = loss_sum / count, correct / count
        if line_due:
            rate = self._rate(self.line_from, now, step)
            left = (steps - step) + (self.epochs - state.epoch - 1) * steps
            eta = datetime.timedelta(seconds=round(left * self.batch / max(rate, 1e-9)))
            self.tracker.info(f"epoch {state.epoch + 1}/{self.epochs}  step {step}/{steps}  loss {loss:.3f}  "
                              f"acc {acc:.3f}  {rate:.0f} img/s  ETA {eta}")
            self.line_from = (now, step)
        if mlflow_due:
            metrics = {"step_train_loss": loss, "step_train_acc": acc}
            if not first:
                metrics["step_images_per_sec"] = self._rate(self.mlflow_from, now, step)
            self.tracker.log_step_metrics(metrics, global_step)
            self.mlflow_from = (now, step)

    def _rate(self, since: tuple[float, int], now: float, step: int) -> float:
        return (step - since[1]) * self.batch / max(now - since[0], 1e-9)
