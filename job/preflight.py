"""Checks, in seconds and on the real allocation, that a big launch will not fail for a boring reason.

    torchrun ... -m job.preflight [--config FILE] [section.key=value ...]     (the same arguments as job.train)

Rendezvous, an all-reduce across every rank (with its bus bandwidth), each local rank's device, the data,
out_dir writable, job.train's own start checks (batch and world size, data size, out_dir's owner, a
finished run, the checkpoint to resume and what would change in it), MLflow reachable with a usable
experiment. Rank 0 prints a pass/fail table; the exit code is 1 if any check failed.
"""

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from job import cli, config, data, distributed, synthetic
from job.config import ConfigError
from job.distributed import Runtime


def check_allreduce(runtime: Runtime, megabytes: int = 64) -> str:
    """Sum a buffer across all ranks; verify the result and report the bus bandwidth (ring formula)."""
    n = megabytes * 2**20 // 4
    x = torch.full((n,), float(runtime.rank + 1), device=runtime.device)
    dist.all_reduce(x)  # warm-up, and the correctness check
    expected = runtime.world_size * (runtime.world_size + 1) / 2
    if not torch.all(x == expected):
        raise RuntimeError(f"all-reduce gave {x[0].item()} instead of {expected}")
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    tic, reps = time.perf_counter(), 3
    for _ in range(reps):
        dist.all_reduce(x)
    x[0].item()
    seconds = (time.perf_counter() - tic) / reps
    if runtime.world_size == 1:
        return f"{megabytes} MB checked; bus bandwidth n/a (one rank: nothing crosses a link)"
    bus = 2 * (runtime.world_size - 1) / runtime.world_size * n * 4 / seconds / 1e9
    return f"{megabytes} MB in {seconds * 1e3:.1f} ms, bus bandwidth {bus:.2f} GB/s"


def check_devices(runtime: Runtime) -> str:
    """Every rank's host and device, so a wrong CUDA_VISIBLE_DEVICES or a missing GPU shows."""
    name = torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else "cpu"
    entries = [None] * runtime.world_size
    dist.all_gather_object(entries, f"{socket.gethostname()}/{runtime.device}({name})")
    return ", ".join(f"rank {r}: {e}" for r, e in enumerate(entries))


def check_data(cfg: config.Config) -> str:
    if cfg.data.source == "synthetic":
        return "synthetic source: nothing to check"
    data.check(cfg.data.root, cfg.data.verify)
    return f"CIFAR-10 under {cfg.data.root} present" + (" and md5-verified" if cfg.data.verify else "")


def check_out_dir(cfg: config.Config) -> str:
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    probe = out / f".preflight-{socket.gethostname()}-{os.getpid()}"
    probe.write_bytes(b"ok")
    probe.unlink()
    return f"{out} writable"


def check_start(cfg: config.Config, runtime: Runtime) -> str:
    """job.train's own start checks: batch vs world size, SyncBN, data size, out_dir's owner, finished state,
    the checkpoint to resume and what this launch would change in it."""
    from job import resume
    from job.launch import check_launch, steps_per_epoch
    from job.outdir import Ownership

    check_launch(cfg, runtime)
    images = _training_images(cfg)
    steps = steps_per_epoch(cfg, runtime, images)
    done = resume.finished_line(cfg)  # job.train's own decision, refusals included
    if done:
        return f"{done}: job.train would exit 0 at once"
    ownership = Ownership(cfg.train.out_dir)
    ownership.acquire()  # raises the owner's name if a launch holds it; the file stays (an empty .owner)
    ownership.release()
    return f"{images} training images, {steps} steps per epoch; {resume.plan(cfg).words()}"


def _training_images(cfg: config.Config) -> int:
    """How many images the training split will hold (the files are read, as job.train will)."""
    total = synthetic.TRAIN_SIZE if cfg.data.source == "synthetic" else len(data.read_cifar10(cfg.data.root)[0][1])
    return len(data.split(total, cfg.data)[1])


def check_mlflow(cfg: config.Config) -> str:
    if not cfg.mlflow.enabled:
        return "mlflow.enabled=false: skipped"
    from job.registry import model_name
    from job.store import store_lock
    from job.mlflow_env import fail_fast, redact, tracking_uri

    fail_fast()
    import mlflow

    uri = tracking_uri(cfg.mlflow.tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    with store_lock(uri):  # the first use of a new sqlite store creates it, as job.train's does
        client.search_experiments(max_results=1)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        raise RuntimeError(f"experiment {cfg.mlflow.experiment!r} is deleted: restore it or choose another")
    state = "exists" if experiment is not None else "will be created"
    return f"{redact(uri)} answers; experiment {cfg.mlflow.experiment!r} {state}; registers as {model_name(cfg)}"


def run_checks(cfg: config.Config, runtime: Runtime, rendezvous_s: float) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) for each check; collectives run on every rank, file checks once per node."""
    results = [("rendezvous", True, f"world_size {runtime.world_size}, nodes {runtime.num_nodes}, "
                                    f"backend {runtime.backend}, {rendezvous_s:.1f} s")]
    checks = [("all-reduce", lambda: check_allreduce(runtime)), ("devices", lambda: check_devices(runtime))]
    if runtime.local_rank == 0:
        checks += [("data", lambda: check_data(cfg)), ("out_dir", lambda: check_out_dir(cfg))]
    if runtime.is_main:
        checks += [("start", lambda: check_start(cfg, runtime)), ("mlflow", lambda: check_mlflow(cfg))]
    for name, check in checks:
        try:
            results.append((name, True, check()))
        except Exception as e:
            results.append((name, False, cli.first_line(e)))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m job.preflight", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="the job's YAML config")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.config, args.overrides)
    except ConfigError as e:
        cli.error(str(e))
        return 2
    tic = time.perf_counter()
    try:
        runtime = distributed.setup(cfg.train.device, cfg.train.timeout_s)
    except Exception as e:
        print(f"preflight: FAIL rendezvous on rank {distributed.env_rank()}: {e}", file=sys.stderr)
        return 1
    try:
        results = run_checks(cfg, runtime, time.perf_counter() - tic)
        gathered = [None] * runtime.world_size
        dist.all_gather_object(gathered, results)
    finally:
        distributed.teardown()
    failed = False
    if runtime.is_main:
        print(f"{'check':<11} {'rank':>4}  result  detail")
        for rank, rows in enumerate(gathered):
            for name, ok, detail in rows:
                if rank == 0 or not ok or name in ("data", "out_dir"):
                    print(f"{name:<11} {rank:>4}  {'pass' if ok else 'FAIL':<6}  {detail}")
    failed = any(not ok for rows in gathered for _, ok, _ in rows)
    if runtime.is_main:
        print("preflight: " + ("FAILED" if failed else "all checks passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
