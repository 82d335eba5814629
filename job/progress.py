"""Progress inside an epoch, for logs that are files (batch schedulers, where tqdm is off) and for MLflow.

Rank 0 prints `epoch 3/200  step 40/88  loss 1.234  acc 0.562  4210 img/s  ETA 1:02:03` every
train.log_every_steps steps or train.log_every_s seconds, and logs the same at a step axis every
mlflow.log_every_steps steps. The running loss and accuracy are rank 0's device sums over the epoch so far;
reading them is a host sync, so it happens only at those points, never per step.
"""

import datetime
import sys
import time

import torch

from job.config import Config
from job.distributed import Runtime
from job.loop import TrainState


class Progress:
    """The per-step hook (train.StepEnd calls it); build() returns None when nothing is asked, so the loop
    then pays nothing."""

    def __init__(self, cfg: Config, tracker, *, lines: bool, mlflow_every: int):
        t = cfg.train
        self.tracker, self.epochs, self.batch = tracker, t.epochs, t.batch_size
        self.every_s = t.log_every_s if lines else 0.0
        self.every_steps = t.log_every_steps if lines else 0
        self.mlflow_every = mlflow_every
        self.last_time, self.last_step = time.monotonic(), None

    @staticmethod
    def build(cfg: Config, runtime: Runtime, tracker) -> "Progress | None":
        lines = runtime.is_main and not sys.stdout.isatty() and bool(cfg.train.log_every_s or cfg.train.log_every_steps)
        mlflow_every = cfg.mlflow.log_every_steps if runtime.is_main and tracker.mlflow else 0
        return Progress(cfg, tracker, lines=lines, mlflow_every=mlflow_every) if lines or mlflow_every else None

    def __call__(self, state: TrainState, step: int, steps: int, sums: torch.Tensor) -> None:
        now = time.monotonic()
        if self.last_step is None or step <= self.last_step:  # a new epoch or launch: rates are measured from here
            self.last_time, self.last_step = now, step
            return
        global_step = state.epoch * steps + step
        line_due = ((self.every_steps and step % self.every_steps == 0)
                    or (self.every_s and now - self.last_time >= self.every_s))
        mlflow_due = self.mlflow_every and global_step % self.mlflow_every == 0
        if not (line_due or mlflow_due):
            return
        loss_sum, correct, count = sums.tolist()
        images_per_s = (step - self.last_step) * self.batch / max(now - self.last_time, 1e-9)
        if line_due:
            left = (steps - step) + (self.epochs - state.epoch - 1) * steps
            eta = datetime.timedelta(seconds=round(left * self.batch / max(images_per_s, 1e-9)))
            self.tracker.info(f"epoch {state.epoch + 1}/{self.epochs}  step {step}/{steps}  "
                              f"loss {loss_sum / count:.3f}  acc {correct / count:.3f}  "
                              f"{images_per_s:.0f} img/s  ETA {eta}")
            self.last_time, self.last_step = now, step
        if mlflow_due:
            self.tracker.log_step_metrics({"step_train_loss": loss_sum / count, "step_train_acc": correct / count,
                                           "step_images_per_sec": images_per_s}, global_step)
