"""Process-level settings, made once before any work: intra-op threads, glibc's reuse of freed memory, and
a worker's exit when its torchrun agent is gone."""

import ctypes
import ctypes.util
import os
import platform
import signal
import sys
import threading
import time

import torch

from job.config import TrainConfig
from job.distributed import Runtime

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>


def tune(cfg: TrainConfig, runtime: Runtime) -> None:
    """train.threads (0: this process's usable CPUs over the local ranks), train.reuse_host_memory, and on CUDA
    cuDNN's autotuner, or deterministic kernels with train.deterministic."""
    # torch's default counts every core of the machine, not those of this container or Slurm allocation
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cfg.threads or "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cfg.threads or max(1, usable // runtime.local_world_size))
    if cfg.reuse_host_memory and runtime.device.type == "cpu":
        keep_freed_memory()
    if runtime.device.type == "cuda" and cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif runtime.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every shape is static: pick the fastest convolution once


def keep_freed_memory() -> bool:
    """glibc serves every allocation from its heap and never trims it: each step's large activations
    reuse resident pages instead of mmap/munmap and hundreds of thousands of page faults per step."""
    libc = ctypes.util.find_library("c")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or not libc:
        return False
    libc = ctypes.CDLL(libc)
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**30))


def exit_with_launcher(grace_s: float = 60.0, poll_s: float = 1.0) -> threading.Thread | None:
    """Under torchrun, stop this worker when its agent dies (SIGKILL, OOM): a thread sees the parent change,
    sends this process SIGTERM (the job's stop path: every rank checkpoints at one step and exits), and SIGKILL
    after grace_s if it is still there. Without it, workers train on as orphans beside the next launch."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # not a torchrun worker: a shell's child keeps its own rules
        return None
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        print(f"warning: the torchrun agent (pid {parent}) is gone; this worker (pid {os.getpid()}) stops",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="exit-with-launcher", daemon=True)
    thread.start()
    return thread
