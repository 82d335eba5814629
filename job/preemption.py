"""Stopping on a signal (SIGTERM from Kubernetes or torchrun, SIGUSR1 from Slurm, SIGINT from Ctrl-C) at one
agreed step.

A signal may reach one rank, some, or all. Each rank's handler only sets a local flag; every
train.stop_check_every_steps steps (and at each epoch's end) the ranks all-reduce their flags (MAX) over a CPU
(gloo) group. The reduction is started without waiting (async_op) and its answer read at the next check, so no
step waits on the network (a blocking call cost ~0.5 ms per step with 2 ranks here; across nodes one reduction
can take longer than a step, which the checks' spacing hides); every rank reads the same answer at the same
check, so they stop together, at most two checks after the signal.
"""

import signal

import torch
import torch.distributed as dist

# Exit code of a worker that stopped on a signal after writing its checkpoint: 128 + SIGTERM, and above
# all not 0, so that no launcher mistakes a preempted job for a finished one. Under torchrun the pod or
# task sees torchrun's own code instead (1 after it was sent SIGTERM itself), so the launch files
# retry on any failure of a signalled job rather than on this number (docs/restarts.md, "Preemption").
PREEMPTED_EXIT_CODE = 143


class Preempted(Exception):
    """Raised after the checkpoint of a signal-stopped job is written."""


class StopSignal:
    """Installs the handlers; requested() is a collective that says whether any rank got a signal."""

    def __init__(self, names: list[str], backend: str, every_steps: int = 1):
        self.received: str | None = None
        self.every_steps = every_steps
        self.pending = None  # (work, flag) of the reduction in flight
        # nccl cannot reduce a CPU tensor: keep a gloo group beside it for this flag
        self.group = dist.new_group(backend="gloo") if backend != "gloo" else None
        for name in names:  # checked signal names (train.stop_signals); [] installs none
            signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def requested(self, step: int | None = None) -> bool:
        """True on every rank once any rank has received a stop signal (call on all ranks, in step).

        step: the optimizer steps done in this epoch; the ranks talk only when it is a multiple of every_steps
        (None: now, as at an epoch's end). A check answers with the reduction the previous check started (False
        at the first) and starts the next."""
        if step is not None and step % self.every_steps:
            return False
        answer = False
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            answer = bool(flag.item())
        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32)
        self.pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return answer

    def close(self) -> None:
        """Wait for the reduction in flight (before the process group goes)."""
        if self.pending is not None:
            self.pending[0].wait()
            self.pending = None
