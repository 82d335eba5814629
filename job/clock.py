"""Step timing without host syncs: CUDA events (read when the caller syncs anyway), perf_counter on the CPU."""

import time

import torch


class StepClock:
    """Marks at step boundaries; durations() gives the seconds between consecutive marks. Inert when disabled.

    The first mark of a process also records the seconds since the process started (launch to first step).
    """

    _launched = False  # whether this process has made its first mark

    def __init__(self, device: torch.device, enabled: bool = True):
        self.enabled, self.cuda = enabled, device.type == "cuda"
        self.marks: list = []
        self.since_launch_s: float | None = None

    def mark(self) -> None:
        if not self.enabled:
            return
        if not self.marks and not StepClock._launched:
            import psutil

            StepClock._launched = True
            self.since_launch_s = time.time() - psutil.Process().create_time()
        if self.cuda:
            self.marks.append(torch.cuda.Event(enable_timing=True))
            self.marks[-1].record()
        else:
            self.marks.append(time.perf_counter())

    def durations(self) -> list[float]:
        """Seconds of each interval between marks (on CUDA this waits for the last one)."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]
