"""What happens around each optimizer step besides the step: the one channel from the loop to the rest of the job.

train_one_epoch (job/loop.py) iterates StepEnd.steps() and calls StepEnd after every step; StepEnd then runs the
hooks asked for (progress lines and step-axis MLflow metrics: job/progress.py; the profiler: job/profile.py), asks
all ranks about stop signals every train.stop_check_every_steps steps, writes a step checkpoint every
train.checkpoint_every_steps steps, marks the step clock (train.step_times), and on a stop raises Preempted once
the checkpoint is on disk. epoch_end() appends the epoch's step times to steps.jsonl. The epoch's end (validation,
the epoch checkpoint, a stop between epochs) is job/train.py's train_epochs.
"""

import sys
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from job import records
from job.checkpoint import Checkpointer
from job.clock import StepClock
from job.loop import TrainState
from job.preemption import Preempted, StopSignal

Hook = Callable[[TrainState, int, int, torch.Tensor], None]


class StepEnd:
    """The per-step channel of one launch (every rank holds one; rank 0's alone draws, times and prints)."""

    def __init__(self, parts, checkpoints: Checkpointer, stop: StopSignal, every_steps: int, hooks: list[Hook], *,
                 main: bool = False, step_times_dir: str | None = None, device: torch.device = torch.device("cpu")):
        self.parts, self.checkpoints, self.stop, self.every_steps = parts, checkpoints, stop, every_steps
        self.hooks, self.main, self.step_times_dir, self.device = hooks, main, step_times_dir, device
        self.clock = StepClock(device, enabled=False)

    def steps(self, epoch: int, start: int, steps: int) -> Iterable[int]:
        """The steps of epoch from start: a tqdm bar on rank 0 when stdout is a terminal; the clock's first mark."""
        self.clock = StepClock(self.device, enabled=self.main and self.step_times_dir is not None)
        self.clock.mark()
        numbers = range(start, steps)
        if not (self.main and sys.stdout.isatty()):
            return numbers
        try:
            from tqdm import tqdm
        except ImportError:  # optional: a bar is for a person watching, training does not need it
            return numbers
        return tqdm(numbers, total=steps - start, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True)

    def __call__(self, state: TrainState, step: int, steps: int, sums: torch.Tensor) -> None:
        """After optimizer step `step` (1-based) of `steps`; sums are this rank's (loss, correct, count) so far."""
        for hook in self.hooks:
            hook(state, step, steps, sums)
        stopping = self.stop.requested(step)  # a collective: every rank gets the same answer at the same step
        if stopping or (self.every_steps and step % self.every_steps == 0 and step < steps):
            totals = sums.clone()
            dist.all_reduce(totals)
            state.step, state.partial = step, totals.tolist()
            self.checkpoints.save(self.parts, state)
        self.clock.mark()  # a step's time holds its hooks, as the next step waits for them
        if stopping:
            self.leave(f"at epoch {state.epoch + 1} step {step}")

    def leave(self, where: str) -> None:
        """The one way a stop ends a launch (inside an epoch, or at its end): once the checkpoint is on disk,
        Preempted naming the signal and where."""
        self.checkpoints.wait()  # on disk before the process goes
        raise Preempted(f"{self.stop.received or 'a stop signal on another rank'} {where}")

    def epoch_end(self, epoch: int, start: int) -> None:
        """One steps.jsonl line per step of the epoch (train.step_times); the launch's first adds since_launch_s."""
        if not self.clock.enabled:
            return
        times = [records.Step(epoch=epoch, step=start + i, step_s=seconds)
                 for i, seconds in enumerate(self.clock.durations())]
        if times and self.clock.since_launch_s is not None:
            times[0]["since_launch_s"] = self.clock.since_launch_s
        records.append(records.steps_path(self.step_times_dir), times)
