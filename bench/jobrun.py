"""(b) job.train end to end, (e) launch to first step, (f) its peak memory, and 2-process DDP scaling.

The real job runs as a user runs it (`python -m job.train`, or torchrun), on the synthetic source at full
width (narrow in --quick), with a training subset of exactly `steps` batches per epoch, no validation split
and MLflow off.
It stops cleanly after `epochs` of `epochs + 1` (train.stop_after_epochs): the training loop is the job's
own; the final test, plots and registry, which no training step waits for, are left out.

Images/s is the median over the epochs after the first (the warm-up, where compilation happens): of the
per-step times in steps.jsonl (the harness turns train.step_times on), else, where no step after the first
epoch was timed, of the per-epoch `images_per_sec` of metrics.jsonl (`source` says which).

Launch to first step: metrics.jsonl is created by Tracker.open(), the last thing run() does before the
first epoch, so its appearance (polled every 10 ms) marks the end of the setup: `launch_to_train_start_s`.
The first step's own time is estimated as epoch 0's training time less (steps - 1) steady steps, and
`launch_to_first_step_done_s` adds the two (with compile, it holds the compilation). With steps.jsonl,
`launch_to_first_step_s` is the job's own: process start to the first step's start.
"""

import statistics
import sys
import tempfile
from pathlib import Path

from bench.child import child_env, run_child
from bench.common import Mode
from job import records


def job_args(overrides: list[str], batch: int, steps: int, epochs: int, device: str, out_dir: Path,
             width: int = 64) -> list[str]:
    """`epochs` epochs of exactly `steps` steps on synthetic data (full width unless told), no validation, no MLflow."""
    return ["data.source=synthetic", f"model.width={width}", "data.val_size=0", f"data.train_subset={steps * batch}",
            f"data.test_subset={batch}", f"train.batch_size={batch}", f"train.eval_batch_size={batch}",
            f"train.epochs={epochs + 1}", f"train.stop_after_epochs={epochs}", f"train.device={device}",
            f"train.out_dir={out_dir}", "train.resume=never", "mlflow.enabled=false", *overrides,
            "train.step_times=true"]


def run_job(mode: Mode, *, batch: int, steps: int, epochs: int, device: str, workdir: Path, width: int = 64,
            nproc: int = 1, threads: int | None = None, timeout_s: float = 3600) -> dict:
    """One launch of job.train; its figures, or {'error': ...}."""
    overrides = mode.job_overrides()
    if overrides is None:
        return {"skipped": f"job.train has no config key for mode {mode.name!r} (bare step only)"}
    tag = f"{mode.name.replace(':', '-')}-n{nproc}-t{threads or 'default'}"
    out_dir = Path(tempfile.mkdtemp(prefix=f"job-{tag}-", dir=workdir))
    args = job_args(overrides, batch, steps, epochs, device, out_dir, width)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    child = run_child([*launcher, "-m", "job.train", *args], child_env(threads, out_dir / "inductor-cache"),
                      out_dir / "log.txt", timeout_s, watch=records.metrics_path(out_dir))
    if child.returncode != 0:
        return {"error": f"job.train exited {child.returncode}", "log_tail": child.log[-3000:]}
    epochs_ips = [r["images_per_sec"] for r in records.read(out_dir).epochs]
    if len(epochs_ips) < 2:
        return {"error": f"{len(epochs_ips)} epoch record(s) in metrics.jsonl; need 2 or more"}
    ips = statistics.median(epochs_ips[1:])
    step_s = batch / ips
    first_step_s = max(0.0, batch * steps / epochs_ips[0] - (steps - 1) * step_s)
    result = {"images_per_sec": ips, "source": "metrics.jsonl epochs", "epoch_images_per_sec": epochs_ips,
              "steps_per_epoch": steps, "batch": batch, "launch_to_train_start_s": child.watch_s,
              "first_step_s_estimate": first_step_s,
              "launch_to_first_step_done_s": (child.watch_s or 0.0) + first_step_s, "wall_s": child.wall_s,
              "peak_rss_mib": child.peak_rss_mib, "nproc": nproc, "omp_num_threads": threads,
              "mode": mode.to_dict(), "command": " ".join(args)}
    return result | _step_figures(out_dir, batch)


def _step_figures(out_dir: Path, batch: int) -> dict:
    """From the job's own per-step record (steps.jsonl): median step after epoch 0, launch to step 1."""
    steps = records.read_steps(out_dir)
    if not steps:
        return {}
    timed = [r["step_s"] for r in steps if r["epoch"] > 0]
    out = {"launch_to_first_step_s": steps[0].get("since_launch_s"), "first_step_s": steps[0]["step_s"]}
    if timed:
        out.update(images_per_sec=batch / statistics.median(timed), source="steps.jsonl", steps_timed=len(timed))
    return out


def ddp_scaling(mode: Mode, *, batch: int, steps: int, epochs: int, workdir: Path, timeout_s: float,
                width: int = 64) -> dict:
    """torchrun with 2 CPU processes of 1 thread each against 1 process of 1 and of 2 threads."""
    runs = {name: run_job(mode, batch=batch, steps=steps, epochs=epochs, device="cpu", workdir=workdir, width=width,
                          nproc=nproc, threads=threads, timeout_s=timeout_s)
            for name, nproc, threads in (("1proc_1thread", 1, 1), ("1proc_2threads", 1, 2),
                                         ("2proc_1thread", 2, 1))}
    out = {"mode": mode.name, "runs": runs}
    ips = {name: r.get("images_per_sec") for name, r in runs.items()}
    if all(ips.values()):
        out["speedup_2proc_vs_1proc_1thread"] = ips["2proc_1thread"] / ips["1proc_1thread"]
        out["speedup_2proc_vs_1proc_2threads"] = ips["2proc_1thread"] / ips["1proc_2threads"]
        out["speedup_2threads_vs_1thread"] = ips["1proc_2threads"] / ips["1proc_1thread"]
    return out
