"""What every part shares: modes, step-time summaries, peak memory, machine facts."""

import datetime
import os
import platform
import resource
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from job import provenance

ROOT = Path(__file__).resolve().parents[1]
MODE_TOKENS = ("eager, fp32, channels_last, bf16, fp16, compile, compile:<torch.compile mode>, foreach, fused, "
               "malloc_cache")


@dataclass(frozen=True)
class Mode:
    """One setting of the step, named by '+'-joined tokens: 'eager', 'compile+channels_last', 'bf16+fused'."""

    name: str
    channels_last: bool = False
    precision: str = "fp32"
    compile: str | None = None
    """None (eager), 'default', or a torch.compile mode such as 'max-autotune-no-cudagraphs'."""
    optimizer: str = "default"
    """SGD implementation: default (job.optim's, which is fused), foreach or fused."""
    malloc_cache: bool = False
    """glibc keeps freed memory for reuse instead of unmapping it (job.host.keep_freed_memory)."""

    @classmethod
    def parse(cls, name: str) -> "Mode":
        kw = {}
        for token in name.split("+"):
            if token in ("eager", "fp32"):
                continue
            if token == "channels_last":
                kw["channels_last"] = True
            elif token in ("bf16", "fp16"):
                kw["precision"] = token
            elif token == "compile" or token.startswith("compile:"):
                kw["compile"] = token.partition(":")[2] or "default"
            elif token in ("foreach", "fused"):
                kw["optimizer"] = token
            elif token == "malloc_cache":
                kw["malloc_cache"] = True
            else:
                raise ValueError(f"unknown token {token!r} in mode {name!r}; tokens: {MODE_TOKENS}")
        return cls(name, **kw)

    def job_overrides(self) -> list[str] | None:
        """job.train's config keys for this mode; None where job.train has no key for part of it."""
        if self.optimizer != "default" or self.compile not in (None, "default") or self.malloc_cache:
            return None
        return [f"train.channels_last={str(self.channels_last).lower()}", f"train.precision={self.precision}",
                f"train.compile={str(self.compile is not None).lower()}"]

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(durations: list[float], warmup: int, batch: int) -> dict:
    """Images/s as batch / the median step time after `warmup` steps; the first step's time on its own."""
    timed = durations[warmup:]
    if not timed:
        raise ValueError(f"{len(durations)} steps timed, none left after {warmup} warm-up steps")
    median = statistics.median(timed)
    return {"images_per_sec": batch / median, "step_s_median": median, "step_s_min": min(timed),
            "step_s_max": max(timed), "first_step_s": durations[0], "steps_timed": len(timed), "batch": batch,
            "step_s": [round(d, 4) for d in durations]}


def peak_memory(device: torch.device) -> dict:
    """Peak resident set size of this process and its reaped children (MiB); on CUDA also max allocated."""
    rss_kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    out = {"peak_rss_mib": rss_kib / 1024}
    if device.type == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: torch.device) -> dict:
    """What the figures depend on: host, CPU, threads, library versions, accelerator, load."""
    import psutil
    import torchvision

    facts = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
             "cpu": cpu_model(), "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
             "memory_gib": psutil.virtual_memory().total / 2**30, "torch": torch.__version__,
             "torchvision": torchvision.__version__, "torch_threads": torch.get_num_threads(),
             "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"), "device": str(device),
             "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
             "load_average_at_start": list(os.getloadavg()), "git_commit": git_commit(), "cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(cuda_devices=torch.cuda.device_count(), cuda_capability=f"{props.major}.{props.minor}",
                     cuda_memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
    return facts


def git_commit() -> str | None:
    """job.provenance's commit of this checkout as one field: '<sha>', '<sha>-dirty', or None outside git."""
    commit = provenance.git_commit(ROOT)
    if commit is None:
        return None
    sha, dirty = commit
    return f"{sha}-dirty" if dirty else sha


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
