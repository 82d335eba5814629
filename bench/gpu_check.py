"""python -m bench.gpu_check [--device cuda|cpu] [--quick] [--data-root DIR] [--budget-s 480] [--out FILE]

One command for a GPU at hand (<= 8 minutes on one GPU): the GPU and versions, the CUDA tests
(tests/test_cuda.py), a host-sync audit of the job's own training step (torch.cuda.set_sync_debug_mode: a
per-step sync fails the check), the bench harness on the device (seed-style baseline, bare step, job.train;
compile off and on) with MFU at 3.33 GFLOP per training image, and, given --data-root, configs/fast.yaml for
the time left with its accuracy. Everything goes to one JSON summary; the exit status is 1 if a part failed.
`--device cpu --quick` runs the same parts at tiny sizes on the CPU (CI proves the script end to end with it).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from bench.child import child_env
from bench.common import ROOT

FLOP_PER_IMAGE = 3.33e9  # SENet18 training on a 32x32 image: forward + backward, multiply-adds counted twice
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, the vendors' datasheets


def say(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def machine(device: str) -> dict:
    info = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpus=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
    return info


def cuda_tests(timeout_s: float) -> dict:
    """tests/test_cuda.py in a child pytest (they skip, with their reason, where CUDA is absent)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-ra", "-n", "0", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    return {"ok": done.returncode == 0, "returncode": done.returncode, "summary": summary,
            "tail": done.stdout[-2000:] if done.returncode else ""}


def sync_audit(device: str, steps: int, width: int) -> dict:
    """One epoch of the job's own step (train_one_epoch with the stop check after each step) under
    torch.cuda.set_sync_debug_mode('warn'): each warning is a host sync. The epoch's end may sync (it reads its
    sums once); a sync per step fails. On the CPU there is nothing to audit: the epoch runs as a smoke test."""
    from job import config, data, distributed
    from job.loop import TrainState, train_one_epoch
    from job.preemption import StopSignal
    from job.tracking import Tracker
    from job.train import build

    with tempfile.TemporaryDirectory() as out:
        cfg = config.load(overrides=[f"train.device={device}", "data.source=synthetic", "data.val_size=0",
                                     f"data.train_subset={64 * steps}", "train.batch_size=64", f"model.width={width}",
                                     "mlflow.enabled=false", f"train.out_dir={out}"])
        runtime = distributed.setup(device, 120)
        try:
            splits = data.load_splits(cfg.data, runtime)
            parts, tracker = build(cfg, runtime, steps, None), Tracker(cfg, runtime)
            stop = StopSignal([], runtime.backend)

            def epoch(number: int) -> None:
                state = TrainState(epoch=number)
                train_one_epoch(parts, splits, cfg, runtime, state, tracker, lambda *_: stop.requested())

            epoch(0)  # warm-up: first allocations, cuDNN's autotuning
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
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
    syncs = [str(w.message).splitlines()[0][:200] for w in caught if "synchroniz" in str(w.message).lower()]
    return {"ok": len(syncs) < steps, "steps": steps, "syncs": len(syncs), "first_syncs": syncs[:3],
            "note": "" if device == "cuda" else "CPU: no CUDA syncs to audit; the epoch ran"}


def bench(device: str, quick: bool, timeout_s: float, workdir: Path) -> dict:
    """The bench harness on the device: baseline, bare step and job.train, compile off and on (quick: eager)."""
    out = workdir / "bench.json"
    modes = "eager" if quick else "bf16+channels_last,compile+bf16+channels_last"
    parts = "bare_step,job" if quick else "baseline,bare_step,job"
    cmd = [sys.executable, "-m", "bench", "--device", device, "--modes", modes, "--parts", parts, "--out", str(out)]
    if quick:
        cmd.append("--quick")
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                          env=child_env(None, workdir / "inductor-cache"))
    if not out.exists():
        return {"ok": False, "returncode": done.returncode, "tail": done.stderr[-2000:]}
    results = json.loads(out.read_text())
    job = {mode: r.get("images_per_sec") for mode, r in results.get("job", {}).items() if isinstance(r, dict)}
    peak = next((v for k, v in PEAK_TFLOPS.items() if device == "cuda" and k in torch.cuda.get_device_name(0)), None)
    mfu = {mode: ips * FLOP_PER_IMAGE / (peak * 1e12) for mode, ips in job.items() if ips and peak}
    return {"ok": done.returncode == 0, "returncode": done.returncode, "job_images_per_sec": job,
            "bare_step_images_per_sec": {m: r.get("images_per_sec") for m, r in results.get("bare_step", {}).items()
                                         if isinstance(r, dict)},
            "baseline_images_per_sec": results.get("baseline", {}).get("images_per_sec"),
            "mfu": mfu, "peak_tflops": peak, "table": done.stdout}


def fast_recipe(data_root: str, device: str, seconds: float, workdir: Path) -> dict:
    """configs/fast.yaml on data_root for at most `seconds`; accuracy from metrics.jsonl (partial if cut)."""
    out = workdir / "fast"
    cmd = [sys.executable, "-m", "job.train", "--config", "configs/fast.yaml", f"data.root={data_root}",
           "data.verify=false", f"train.device={device}", "mlflow.enabled=false", f"train.out_dir={out}"]
    tic = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=seconds,
                              env=child_env(None, workdir / "inductor-cache"))
        returncode = done.returncode
    except subprocess.TimeoutExpired:
        returncode = None
    path = out / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    epochs = [r for r in records if "val_acc" in r and "epoch" in r]
    final = next((r for r in records if "test_acc" in r), {})
    return {"ok": returncode == 0, "returncode": returncode, "wall_s": round(time.monotonic() - tic, 1),
            "epochs_done": len(epochs), "val_acc": [r["val_acc"] for r in epochs], "test_acc": final.get("test_acc"),
            "images_per_sec": [r["images_per_sec"] for r in epochs]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: proves the script, measures nothing")
    parser.add_argument("--data-root", help="a CIFAR-10 root (e.g. the dev split): train fast.yaml in the time left")
    parser.add_argument("--budget-s", type=float, default=480, help="the whole check's time (default 8 minutes)")
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available here (use --device cpu --quick to try the script)",
              file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.budget_s
    summary = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(args.device), "quick": args.quick}
    with tempfile.TemporaryDirectory() as tmp:
        say("CUDA tests")
        summary["cuda_tests"] = cuda_tests(timeout_s=max(60.0, deadline - time.monotonic()))
        say("host-sync audit of the training step")
        summary["sync_audit"] = sync_audit(args.device, steps=4 if args.quick else 30, width=8 if args.quick else 64)
        say("bench harness")
        summary["bench"] = bench(args.device, args.quick, max(60.0, deadline - time.monotonic()), Path(tmp))
        left = deadline - time.monotonic() - 10
        if args.data_root and left > 30:
            say(f"configs/fast.yaml on {args.data_root} for up to {left:.0f} s")
            summary["fast_recipe"] = fast_recipe(args.data_root, args.device, left, Path(tmp))
    failed = [k for k, v in summary.items() if isinstance(v, dict) and v.get("ok") is False and k != "fast_recipe"]
    summary["failed"] = failed
    args.out.write_text(json.dumps(summary, indent=1))
    for part in ("cuda_tests", "sync_audit", "bench", "fast_recipe"):
        if part in summary:
            brief = {k: v for k, v in summary[part].items() if k not in ("tail", "table")}
            print(f"{part:<12} {'ok' if summary[part].get('ok') else 'FAILED'}  {json.dumps(brief)[:300]}")
    print(f"gpu_check: {'FAILED: ' + ', '.join(failed) if failed else 'all parts passed'}; summary in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
