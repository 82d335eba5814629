"""The parts of bench/gpu_check.py, each run by it in a process of its own under a time limit of its own:

    python -m bench.gpu_parts NAME FUNCTION PARAMS_JSON OUT_JSON     FUNCTION: cuda_tests, sync_audit, bench or
                                                                     fast_recipe; NAME: gpu_check's for the part

A part writes its result to OUT_JSON as it ends. GPU_CHECK_OVERRUN=NAME makes that part hang instead, leaving
processes behind of every kind gpu_check must kill (overrun()), so that a test can prove its overrun handling on
the CPU.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# torch and the project are imported by the parts themselves: a part starts (and GPU_CHECK_OVERRUN hangs) at once
FLOP_PER_IMAGE = 3.33e9  # SENet18 training on a 32x32 image: forward + backward, multiply-adds counted twice
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, the vendors' datasheets
# every per-step option of the recipe on at once: each adds device work to the step, and none may add a host sync
RECIPE_OPTIONS = ["train.ema_decay=0.99", "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0", "data.cutout=8",
                  "train.clip_grad_norm=1.0", "train.label_smoothing=0.1", "data.flip=alternate",
                  "data.pad_mode=reflect", "train.bn_bias_lr_mult=8"]
# the two weight averagers exclude each other: the audit runs the epoch once with each (Lookahead every 2 steps, so
# its average-and-copy-back happens inside the audited steps)
AVERAGERS = {"average": [],
             "lookahead": ["train.ema_decay=0.95", "train.ema_mode=lookahead", "train.ema_every_steps=2"]}


def cuda_tests() -> dict:
    """tests/test_cuda.py in a child pytest (they skip, with their reason, where CUDA is absent). The project's
    addopts (pytest-xdist's -n) are dropped: plain pytest is all the device image needs."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "-o", "addopts=",
           "tests/test_cuda.py"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    return {"ok": done.returncode == 0, "returncode": done.returncode, "summary": summary,
            "tail": done.stdout[-2000:] if done.returncode else ""}


class SyncCounter:
    """Host syncs by the step that made them: each warning of torch.cuda.set_sync_debug_mode('warn') is one.
    progress() wraps the step numbers the loop iterates (StepEnd.steps) and marks where each step starts."""

    def __init__(self):
        self.caught: list = []
        """The warnings recorded (warnings.catch_warnings(record=True)'s list, set by the audit)."""
        self.marks: list[int] = []
        """len(caught) at the start of each step, then once more after the last."""

    def progress(self, iterable):
        for item in iterable:
            self.marks.append(len(self.caught))
            yield item
        self.marks.append(len(self.caught))

    def _syncs(self, start: int, end: int | None) -> list[str]:
        return [f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0][:120]}" for w in self.caught[start:end]
                if "synchroniz" in str(w.message).lower()]

    def report(self) -> dict:
        """ok only if no step synced: a sync in a step makes the host wait for the device there, every epoch. The
        epoch's edges (before the first step; after the last, where the epoch's sums are read once) may sync."""
        per_step = [self._syncs(a, b) for a, b in zip(self.marks, self.marks[1:])]
        edges = (self._syncs(0, self.marks[0]) + self._syncs(self.marks[-1], None) if self.marks
                 else self._syncs(0, None))
        inside = [f"step {i + 1}: {s}" for i, syncs in enumerate(per_step) for s in syncs]
        return {"ok": bool(per_step) and not inside, "steps": len(per_step), "syncs_in_steps": len(inside),
                "steps_with_syncs": [i + 1 for i, syncs in enumerate(per_step) if syncs], "first_syncs": inside[:5],
                "syncs_at_epoch_edges": len(edges), "edge_syncs": edges[:5]}


def sync_audit(*, device: str, steps: int, width: int) -> dict:
    """One epoch of the job's own loop (train_one_epoch with StepEnd, the stop check included) with every recipe
    option on, after a warm-up epoch, under torch.cuda.set_sync_debug_mode('warn'); any sync inside a step fails. It
    runs once per weight averager (AVERAGERS: train.ema_mode average, then lookahead), each with the other options
    of RECIPE_OPTIONS.
    On the CPU there are no CUDA syncs to see: the epochs run and the counting is the same."""
    reports = {name: _audit_epoch(device, steps, width, [*RECIPE_OPTIONS, *extra]) for name, extra in AVERAGERS.items()}
    return {"ok": all(r["ok"] for r in reports.values()), "steps": steps,
            "syncs_in_steps": sum(r["syncs_in_steps"] for r in reports.values()),
            "syncs_at_epoch_edges": sum(r["syncs_at_epoch_edges"] for r in reports.values()),
            "first_syncs": [f"{name} {s}" for name, r in reports.items() for s in r["first_syncs"]][:5],
            "options": RECIPE_OPTIONS, "averagers": reports,
            "note": "" if device == "cuda" else "CPU: no CUDA syncs to see; the epochs ran and were counted"}


def _audit_epoch(device: str, steps: int, width: int, options: list[str]) -> dict:
    """SyncCounter's report of the audited epoch of a run with these options."""
    import torch

    from job import config, data, distributed, host
    from job.checkpoint import Checkpointer
    from job.loop import TrainState, train_one_epoch
    from job.preemption import StopSignal
    from job.build import build
    from job.steps import StepEnd

    counter = SyncCounter()
    with tempfile.TemporaryDirectory() as out:
        cfg = config.load(overrides=[f"train.device={device}", "data.source=synthetic", "data.val_size=0",
                                     f"data.train_subset={64 * steps}", "train.batch_size=64", f"model.width={width}",
                                     "mlflow.enabled=false", "train.log_every_s=0", f"train.out_dir={out}", *options])
        runtime = distributed.setup(device, 120)
        try:
            host.tune(cfg.train, runtime)  # as job.train: cuDNN's autotuner
            splits = data.load_splits(cfg.data, runtime)
            parts = build(cfg, runtime, steps, None)
            stop = StopSignal([], runtime.backend, cfg.train.stop_check_every_steps)
            on_step = StepEnd(parts, Checkpointer(out, runtime, cfg.to_dict()), stop, 0, [])

            def epoch(number: int) -> None:
                train_one_epoch(parts, splits, cfg, runtime, TrainState(epoch=number), on_step)

            epoch(0)  # warm-up: first allocations, cuDNN's autotuning
            numbers = on_step.steps
            on_step.steps = lambda epoch, start, steps: counter.progress(numbers(epoch, start, steps))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                counter.caught = caught
                if device == "cuda":
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    epoch(1)
                finally:
                    if device == "cuda":
                        torch.cuda.set_sync_debug_mode(0)
            stop.close()
        finally:
            distributed.teardown()
    return {**counter.report(), "options": options}


def bench(*, device: str, quick: bool, modes: str, parts: str, timeout_s: float, workdir: str) -> dict:
    """The bench harness on the device (bench/__main__.py) for these modes and parts; images/s and MFU."""
    import torch

    from bench.child import child_env

    out = Path(workdir) / "bench.json"
    cmd = [sys.executable, "-m", "bench", "--device", device, "--modes", modes, "--parts", parts, "--out", str(out),
           "--timeout", str(timeout_s), *(["--quick"] if quick else [])]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env=child_env(None, Path(workdir) / "inductor-cache"))
    if not out.exists():
        return {"ok": False, "returncode": done.returncode, "tail": done.stderr[-2000:]}
    results = json.loads(out.read_text())
    figures = {part: {mode: r.get("images_per_sec") for mode, r in results.get(part, {}).items() if isinstance(r, dict)}
               for part in ("job", "bare_step")}
    peak = next((v for k, v in PEAK_TFLOPS.items() if device == "cuda" and k in torch.cuda.get_device_name(0)), None)
    mfu = {f"{part}.{mode}": ips * FLOP_PER_IMAGE / (peak * 1e12)
           for part, by_mode in figures.items() for mode, ips in by_mode.items() if ips and peak}
    return {"ok": done.returncode == 0, "returncode": done.returncode, "job_images_per_sec": figures["job"],
            "bare_step_images_per_sec": figures["bare_step"],
            "baseline_images_per_sec": results.get("baseline", {}).get("images_per_sec"),
            "mfu": mfu, "peak_tflops": peak, "table": done.stdout,
            "tail": done.stderr[-2000:] if done.returncode else ""}


def fast_recipe(*, data_root: str, device: str, seconds: float, workdir: str) -> dict:
    """configs/fast.yaml on data_root for at most `seconds`; accuracy from metrics.jsonl (partial if cut)."""
    from bench.child import child_env, run_child
    from job import records

    out = Path(workdir) / "fast"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "job.train", "--config", "configs/fast.yaml", f"data.root={data_root}",
           "data.verify=false", f"train.device={device}", "mlflow.enabled=false", f"train.out_dir={out}"]
    child = run_child(cmd, child_env(None, Path(workdir) / "inductor-cache"), Path(workdir) / "fast.log", seconds)
    found = records.read(out)
    epochs, final = found.epochs, found.final or {}
    return {"ok": child.returncode == 0, "returncode": child.returncode, "wall_s": round(child.wall_s, 1),
            "epochs_done": len(epochs), "val_acc": [r["val_acc"] for r in epochs], "test_acc": final.get("test_acc"),
            "images_per_sec": [r["images_per_sec"] for r in epochs],
            "tail": child.log[-2000:] if child.returncode not in (0, 124) else ""}


PARTS = {"cuda_tests": cuda_tests, "sync_audit": sync_audit, "bench": bench, "fast_recipe": fast_recipe}


def overrun() -> None:
    """Hang as a stuck part would, with a process in this part's group, one in a session of its own, and a daemon
    (its parent exits at once, so it is under no part's process: only gpu_check, its subreaper, sees it)."""
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)", f"overrun-of-{os.getpid()}"]  # a tag to find
    subprocess.Popen(sleeper)
    subprocess.Popen(sleeper, start_new_session=True)
    subprocess.run([sys.executable, "-c", f"import subprocess; subprocess.Popen({sleeper!r}, start_new_session=True)"])
    time.sleep(600)


def main(argv: list[str]) -> int:
    name, function, params, out = argv[0], PARTS[argv[1]], json.loads(argv[2]), Path(argv[3])
    if os.environ.get("GPU_CHECK_OVERRUN") == name:
        overrun()
    tmp = out.with_name(f".{out.name}.tmp")  # a reader never sees half a result
    tmp.write_text(json.dumps(function(**params)))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
