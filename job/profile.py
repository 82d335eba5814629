"""train.profile: torch.profiler over a window of training steps, written under <out_dir>/profile/rank<N>/.

trace.json      Chrome/Perfetto trace (ui.perfetto.dev, or chrome://tracing): CPU ops, and CUDA kernels on a GPU
ops.txt         key_averages(): the ops by self time, the top 40
memory.pickle   CUDA only: the allocator's history from the warm-up to the end of the window (pytorch.org/memory_viz)

The window counts this launch's steps: profile_skip, then profile_warmup (run, discarded), then
profile_active (recorded). A run that ends inside the window writes what it recorded. With train.profile
false nothing here is imported or called from the step loop.
"""

from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from job.config import Config
from job.distributed import Runtime
from job.loop import TrainState
from job.outdir import PROFILE

MEMORY_EVENTS = 100_000


class StepProfiler:
    """The per-step hook (job/steps.py's StepEnd calls it) that moves torch.profiler's schedule one step on; a context
    manager around the epochs, so that a run ending inside the window still writes (and stops recording)."""

    def __init__(self, cfg: Config, runtime: Runtime, say: Callable[[str], None]):
        t = cfg.train
        self.dir = Path(t.out_dir) / PROFILE / f"rank{runtime.rank}"
        self.cuda = runtime.device.type == "cuda"
        self.say, self.skip, self.steps, self.done, self.recording = say, t.profile_skip, 0, False, False
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.prof = profile(activities=activities, record_shapes=True, profile_memory=True,
                            schedule=schedule(skip_first=t.profile_skip, wait=0, warmup=t.profile_warmup,
                                              active=t.profile_active, repeat=1),
                            on_trace_ready=self._write)

    @staticmethod
    def build(cfg: Config, runtime: Runtime, say: Callable[[str], None]) -> "StepProfiler | None":
        wanted = cfg.train.profile_ranks == "all" or runtime.is_main  # the caller asked for train.profile
        return StepProfiler(cfg, runtime, say) if wanted else None

    def __enter__(self) -> "StepProfiler":
        self.prof.start()
        self._memory(self.skip == 0)
        return self

    def __call__(self, state: TrainState, step: int, steps: int, sums: torch.Tensor) -> None:
        if self.done:
            return
        self.steps += 1
        self._memory(self.steps >= self.skip)  # from the warm-up on: the allocator's history over the window
        self.prof.step()

    def __exit__(self, *exc) -> None:
        if not self.done:  # still inside the window: writes what it recorded (nothing before the warm-up)
            self.prof.stop()
            self.done = True
        self._memory(False)

    def _memory(self, on: bool) -> None:
        if self.cuda and on != self.recording:
            if on:
                torch.cuda.memory._record_memory_history(max_entries=MEMORY_EVENTS)
            else:
                torch.cuda.memory._record_memory_history(enabled=None)
            self.recording = on

    def _write(self, prof: profile) -> None:
        self.done = True
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(self.dir / "trace.json"))
            sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
            (self.dir / "ops.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")
            if self.cuda:
                torch.cuda.memory._dump_snapshot(str(self.dir / "memory.pickle"))
        except OSError as e:  # a profile is not worth the run: say so and train on
            self.say(f"profile: cannot write {self.dir}: {e.strerror or e}; training goes on")
        else:
            self.say(f"profile: {self.dir} (trace.json, ops.txt{', memory.pickle' if self.cuda else ''})")
        self._memory(False)
