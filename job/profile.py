"""train.profile: torch.profiler over a window of training steps, written under <out_dir>/profile/rank<N>/.

trace.json      Chrome/Perfetto trace (ui.perfetto.dev, or chrome://tracing): CPU ops, and CUDA kernels on a GPU
ops.txt         key_averages(): the ops by self time, the top 40
memory.pickle   CUDA only: the allocator's history over the window (pytorch.org/memory_viz)

The window counts this launch's steps: profile_skip, then profile_warmup (run, discarded), then
profile_active (recorded). A run that ends inside the window writes what it recorded. With train.profile
false nothing here is imported or called from the step loop.
"""

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from job.config import Config
from job.distributed import Runtime

MEMORY_EVENTS = 100_000


class StepProfiler:
    """The per-step hook (train.StepEnd calls it) that moves torch.profiler's schedule one step on."""

    def __init__(self, cfg: Config, runtime: Runtime, say):
        t = cfg.train
        self.dir = Path(t.out_dir) / "profile" / f"rank{runtime.rank}"
        self.cuda = runtime.device.type == "cuda"
        self.say, self.done = say, False
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.prof = profile(activities=activities, record_shapes=True, profile_memory=True,
                            schedule=schedule(skip_first=t.profile_skip, wait=0, warmup=t.profile_warmup,
                                              active=t.profile_active, repeat=1),
                            on_trace_ready=self._write)
        self.prof.start()
        if self.cuda:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_EVENTS)

    @staticmethod
    def build(cfg: Config, runtime: Runtime, say) -> "StepProfiler | None":
        wanted = cfg.train.profile and (cfg.train.profile_ranks == "all" or runtime.is_main)
        return StepProfiler(cfg, runtime, say) if wanted else None

    def __call__(self, state, step: int, steps: int, sums: torch.Tensor) -> None:
        if not self.done:
            self.prof.step()

    def close(self) -> None:
        """End of training (or of this launch): stop, writing a window that was still recording."""
        if not self.done:
            self.prof.stop()
            self.done = True

    def _write(self, prof: profile) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.dir / "trace.json"))
        sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        (self.dir / "ops.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")
        if self.cuda:
            torch.cuda.memory._dump_snapshot(str(self.dir / "memory.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        self.done = True
        self.say(f"profile: {self.dir} (trace.json, ops.txt{', memory.pickle' if self.cuda else ''})")
