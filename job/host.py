"""Process-level CPU settings, made once before any work: intra-op threads and glibc's reuse of freed memory."""

import ctypes
import ctypes.util
import os
import platform

import torch

from job.config import TrainConfig
from job.distributed import Runtime

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>


def tune(cfg: TrainConfig, runtime: Runtime) -> None:
    """train.threads (0: this process's usable CPUs over the local ranks) and train.reuse_host_memory."""
    # torch's default counts every core of the machine, not those of this container or Slurm allocation
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cfg.threads or "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cfg.threads or max(1, usable // runtime.local_world_size))
    if cfg.reuse_host_memory and runtime.device.type == "cpu":
        keep_freed_memory()


def keep_freed_memory() -> bool:
    """glibc serves every allocation from its heap and never trims it: each step's large activations
    reuse resident pages instead of mmap/munmap and hundreds of thousands of page faults per step."""
    libc = ctypes.util.find_library("c")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or not libc:
        return False
    libc = ctypes.CDLL(libc)
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**30))
