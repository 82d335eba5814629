"""Process-group setup and teardown, and the Runtime object that carries rank, world size and device.

Under torchrun the environment (RANK, WORLD_SIZE, LOCAL_RANK, ...) describes the group; a plain
`python -m job.train` is a group of one built on an in-process store, so the same collectives work.
"""

import datetime
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from job.cli import first_line


class CollectiveTimeout(RuntimeError):
    """A collective timed out; the message names the ranks that did not answer."""


class LaunchError(RuntimeError):
    """The launch does not fit the machine (e.g. more processes per node than GPUs); one line."""


@dataclass(frozen=True)
class Runtime:
    """Where this process sits in the job. Built once by setup() and passed to whoever needs it."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    num_nodes: int
    device: torch.device
    backend: str
    node_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, tracks and writes checkpoints."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def pick_device(preference: str, local_rank: int, local_world_size: int) -> torch.device:
    """One device per local rank: cuda:<local_rank> when CUDA is wanted and present, else the CPU."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LaunchError(f"train.device=cuda but CUDA is not available on this node ({socket.gethostname()})")
    gpus = torch.cuda.device_count()
    if local_world_size > gpus:
        raise LaunchError(f"{local_world_size} processes per node but only {gpus} GPU(s) on this node: "
                          f"use --nproc_per_node={gpus} (or train.device=cpu)")
    return torch.device("cuda", local_rank)


FR_DUMP_VARS = ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")  # the newer name, the older


def flight_recorder_env(trace_dir: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """Where NCCL's Flight Recorder dumps on a timeout (<trace_dir>/rank_<N>, one file per rank) unless the
    launch names a place: torch's default is /tmp of each node, gone with the node. Both names, for the torch
    releases that read only the older one. The launch files turn the recorder on (TORCH_FR_BUFFER_SIZE,
    TORCH_NCCL_DUMP_ON_TIMEOUT); docs/observability.md ("Hangs") shows how to read a dump."""
    if any(name in environ for name in FR_DUMP_VARS):
        return {}
    return {name: f"{trace_dir}/rank_" for name in FR_DUMP_VARS}


def setup(device_preference: str, timeout_s: int, trace_dir: Path | None = None) -> Runtime:
    """Join (or, without torchrun, create) the process group; nccl on CUDA (its Flight Recorder dumping into
    trace_dir), gloo on the CPU."""
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", 1)
    num_nodes = _env_int("GROUP_WORLD_SIZE", max(1, world_size // local_world_size))
    device = pick_device(device_preference, local_rank, local_world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dumps = flight_recorder_env(trace_dir, os.environ) if trace_dir is not None else {}
        if dumps:  # read when the NCCL group is made; the dump itself makes no directories
            trace_dir.mkdir(parents=True, exist_ok=True)
            os.environ.update(dumps)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    node_rank = _env_int("GROUP_RANK", 0)
    global _health_group
    _health_group = dist.new_group(backend="gloo")  # made now: once a rank is stuck, no new group forms
    return Runtime(rank, local_rank, world_size, local_world_size, num_nodes, device, backend, node_rank)


def layout(runtime: Runtime) -> str:
    """'node 0: ranks 0-3; node 1: ranks 4-7' from every rank's node rank (a collective)."""
    node_of = [0] * runtime.world_size
    dist.all_gather_object(node_of, runtime.node_rank)
    nodes = {}
    for rank, node in enumerate(node_of):
        nodes.setdefault(node, []).append(rank)
    return "; ".join(f"node {n}: ranks {r[0]}-{r[-1]}" if len(r) > 1 else f"node {n}: rank {r[0]}"
                     for n, r in sorted(nodes.items()))


_health_group = None


def diagnose_timeout(error: Exception, timeout_s: int, probe_s: int = 10) -> Exception:
    """After a timed-out collective: ask every rank over a spare gloo group who is still there.

    Returns a CollectiveTimeout naming the ranks that did not answer (dead or stuck), or error itself
    if it was not a timeout.
    """
    if "timed out" not in str(error).lower() or _health_group is None:
        return error
    probe_s = min(probe_s, timeout_s)  # no longer than a collective itself may take
    try:
        dist.monitored_barrier(group=_health_group, timeout=datetime.timedelta(seconds=probe_s), wait_all_ranks=True)
        missing = "every rank answered a probe afterwards, so one was only slow"
    except RuntimeError as e:  # gloo: "[Rank 0]: Ranks 1, 3 failed to pass monitoredBarrier in 10000 ms"
        found = re.search(r"Ranks? ([\d, ]+) failed to pass", str(e))
        missing = (f"rank(s) {found.group(1).strip()} did not answer a {probe_s}s probe" if found
                   else first_line(e))
    return CollectiveTimeout(f"a collective timed out after {timeout_s}s (train.timeout_s) on rank "
                             f"{dist.get_rank()}: {missing} — a rank is dead or stuck; see its log")


def teardown() -> None:
    """Destroy the process groups if there are any (safe to call on any exit path)."""
    global _health_group
    _health_group = None  # dropped before the groups go, not left to the interpreter's shutdown
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def raise_together(error: Exception | None, device: torch.device, elsewhere: Exception) -> None:
    """After a step that only some ranks do (rank 0 writes, local rank 0 downloads), every rank calls this: all
    return if none failed; else each raises, its own error or, where it had none, elsewhere (one all-reduce)."""
    if not all_agree(error is None, device):
        raise error or elsewhere


def all_agree(ok: bool, device: torch.device) -> bool:
    """True only if ok is true on every rank; every rank must call it (used where a barrier could hang)."""
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def env_rank() -> int:
    """The global rank from the launcher's environment (0 without torchrun); usable before setup()."""
    return _env_int("RANK", 0)
