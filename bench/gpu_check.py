"""python -m bench.gpu_check [--device cuda|cpu] [--quick] [--data-root DIR] [--budget-s 480] [--parts P,...]
                             [--limit PART=SECONDS ...] [--out FILE]

One command for a GPU at hand (<= 8 minutes on one GPU): the GPU and versions, the CUDA tests (tests/test_cuda.py),
a host-sync audit of the job's own training loop with every recipe option on (torch.cuda.set_sync_debug_mode: any
sync inside a step fails the check), the bench harness on the device (seed-style baseline, bare step and job.train
in bf16 + channels_last; job.train compiled; the bare step compiled with CUDA graphs) with MFU at 3.33 GFLOP per
training image, and, given --data-root, configs/fast.yaml for the time left with its accuracy.

Each part runs in a process of its own (bench/gpu_parts.py) under a time limit of its own (PARTS), capped by the
budget's time left. One that overruns is killed with every process under it, whatever session or group they
started (this process is their subreaper: none escapes to init), recorded as timed out, and the next part starts.
The JSON summary is rewritten after every part, so a run cut short still holds what it measured, what overran and
what it skipped. Exit status: 0, 1 if a part failed or overran, 2 if something it needs is missing.
`--device cpu --quick` runs the same parts at tiny sizes on the CPU, eager only (CI proves the script with it).

Needs torch and torchvision (the GPU image has them), pyyaml, psutil and pytest; not mlflow, matplotlib, tqdm or
pytest-xdist. On such an image: pip install pyyaml psutil pytest
"""

import argparse
import ctypes
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

NEEDS = {"yaml": "pyyaml", "psutil": "psutil", "pytest": "pytest", "torchvision": "torchvision"}  # module: package
INSTALL = "pip install pyyaml psutil pytest"
BF16 = "bf16+channels_last"  # the job's own settings on a GPU (train.precision=auto, train.channels_last=true)
# name: (its time limit in seconds, its function in bench/gpu_parts.py), run in this order; the limits add up to
# the default budget. fast_recipe gets what the others left.
PARTS = {"cuda_tests": (150, "cuda_tests"), "sync_audit": (45, "sync_audit"), "bench_eager": (75, "bench"),
         "bench_compile": (120, "bench"), "bench_cudagraphs": (90, "bench"), "fast_recipe": (None, "fast_recipe")}
MIN_PART_S = 20  # no part starts with less of the budget left


def say(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def missing() -> list[str]:
    """The packages of NEEDS that this Python cannot import."""
    return [package for module, package in NEEDS.items() if importlib.util.find_spec(module) is None]


def adopt_orphans() -> bool:
    """Become the subreaper of every descendant (Linux): a process a part leaves behind, whose parent died, comes to
    this process (sweep() kills and reaps it) instead of to init, where it would run on unseen."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def skip_reason(name: str, args: argparse.Namespace) -> str | None:
    if args.parts and name not in args.parts:
        return "not in --parts"
    if args.quick and name in ("bench_compile", "bench_cudagraphs"):
        return "--quick: eager only"
    if name == "fast_recipe" and not args.data_root:
        return "no --data-root"
    return None


def params(name: str, args: argparse.Namespace, limit_s: float, workdir: Path) -> dict:
    """The keyword arguments of the part's function in bench/gpu_parts.py."""
    device, quick = args.device, args.quick
    if name == "cuda_tests":
        return {}
    if name == "sync_audit":
        return {"device": device, "steps": 4 if quick else 30, "width": 8 if quick else 64}
    if name == "fast_recipe":
        return {"data_root": args.data_root, "device": device, "seconds": max(limit_s - 10, limit_s / 2), "workdir": str(workdir)}
    modes, parts = {"bench_eager": ("eager", "bare_step,job") if quick else (BF16, "baseline,bare_step,job"),
                    "bench_compile": (f"compile+{BF16}", "job"),
                    "bench_cudagraphs": (f"compile:reduce-overhead+{BF16}", "bare_step")}[name]
    return {"device": device, "quick": quick, "modes": modes, "parts": parts, "timeout_s": max(limit_s - 10, limit_s / 2),
            "workdir": str(workdir)}


def run_part(name: str, function: str, kwargs: dict, limit_s: float, workdir: Path) -> dict:
    """The part in a child process of its own session for at most limit_s: its result, its status (ok, failed or
    timed_out), its wall time, and the processes killed when it overran."""
    from bench.child import child_env, run_child

    out = workdir / "result.json"
    cmd = [sys.executable, "-m", "bench.gpu_parts", name, function, json.dumps(kwargs), str(out)]
    child = run_child(cmd, child_env(None, workdir / "inductor-cache"), workdir / "log.txt", limit_s)
    left = sweep()
    times = {"limit_s": round(limit_s, 1), "wall_s": round(child.wall_s, 1)}
    if child.returncode == 124:  # run_child's code for a child it killed at the limit
        return {"ok": False, "status": "timed_out", **times, "killed": child.killed + left,
                "log_tail": child.log[-2000:]}
    try:  # written atomically by bench.gpu_parts; a part that died mid-way leaves none
        result = json.loads(out.read_text())
    except (OSError, ValueError):
        result = {"ok": False, "returncode": child.returncode, "log_tail": child.log[-3000:]}
    return {**result, "status": "ok" if result.get("ok") else "failed", **times,
            **({"left_running_killed": left} if left else {})}


def sweep(timeout_s: float = 30) -> list[dict]:
    """Kill and reap whatever a part left behind (its processes, and their orphans, which come to this process as
    their subreaper and wait to be reaped); returns those that were still running."""
    import psutil

    from bench.child import kill_tree

    found, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        children = psutil.Process().children()
        if not children:
            break
        for child in children:
            found += kill_tree(child.pid, wait=False)  # a zombie is not found: it ran no more
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            break
        time.sleep(0.05)
    return found


def merge_bench(summary: dict, result: dict) -> None:
    """The figures of every bench part in one place: images/s per mode of job.train and the bare step, MFU."""
    bench = summary.setdefault("bench", {"job_images_per_sec": {}, "bare_step_images_per_sec": {}, "mfu": {}})
    for key in ("job_images_per_sec", "bare_step_images_per_sec", "mfu"):
        bench[key].update(result.get(key) or {})
    for key in ("baseline_images_per_sec", "peak_tflops"):
        if result.get(key) is not None:
            bench[key] = result[key]


def write(path: Path, summary: dict) -> None:
    """Whole or not at all: a reader, or a run killed while writing, finds the previous summary or this one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()  # the budget counts this process's own start-up too
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[3],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, eager only: proves the script, measures "
                                                             "nothing")
    parser.add_argument("--data-root", help="a CIFAR-10 root (e.g. the dev split): train fast.yaml in the time left")
    parser.add_argument("--budget-s", type=float, default=480, help="the whole check's time (default 8 minutes)")
    parser.add_argument("--parts", help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    parser.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS",
                        help="another time limit for a part (repeatable); defaults: "
                             + ", ".join(f"{k} {v[0]}" for k, v in PARTS.items() if v[0]))
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"))
    args = parser.parse_args(argv)
    limits = {name: limit for name, (limit, _) in PARTS.items()}
    for item in args.limit:
        name, _, seconds = item.partition("=")
        if name not in PARTS or not seconds.replace(".", "", 1).isdigit() or float(seconds) <= 0:
            parser.error(f"--limit {item}: expected PART=SECONDS (> 0) with PART one of {', '.join(PARTS)}")
        limits[name] = float(seconds)
    args.parts = set(args.parts.split(",")) if args.parts else None
    if args.parts and args.parts - set(PARTS):
        parser.error(f"--parts: unknown {', '.join(sorted(args.parts - set(PARTS)))}; parts: {', '.join(PARTS)}")

    summary = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": args.quick, "budget_s": args.budget_s,
               "limits_s": limits, "failed": [], "timed_out": [], "skipped": {}}
    lacking = missing()
    if lacking:
        write(args.out, {**summary, "missing": lacking})
        print(f"error: gpu_check needs {', '.join(lacking)}, not installed here; on an image with torch and "
              f"torchvision: {INSTALL}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available here (use --device cpu --quick to try the script)",
              file=sys.stderr)
        return 2
    from bench.common import machine  # after the check above: it needs pyyaml, psutil and torchvision

    summary["machine"] = machine(torch.device(args.device))
    summary["subreaper"] = adopt_orphans()
    deadline = started + args.budget_s
    write(args.out, summary)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for name, (_, function) in PARTS.items():
            left = deadline - time.monotonic()
            reason = skip_reason(name, args) or (f"{left:.0f} s of the budget left" if left < MIN_PART_S else None)
            if reason:
                summary["skipped"][name] = reason
                continue
            limit = left if limits[name] is None else min(limits[name], left)
            say(f"{name}: up to {limit:.0f} s")
            workdir = Path(tmp) / name
            workdir.mkdir()
            summary[name] = result = run_part(name, function, params(name, args, limit, workdir), limit, workdir)
            if result["status"] != "ok":
                summary["failed"].append(name)
            if result["status"] == "timed_out":
                summary["timed_out"].append(name)
            if function == "bench":
                merge_bench(summary, result)
            write(args.out, summary)
            say(f"    {result['status']} after {result['wall_s']} s")
    write(args.out, summary)
    for name in PARTS:
        if name in summary["skipped"]:
            print(f"{name:<16} skipped: {summary['skipped'][name]}")
        else:
            brief = {k: v for k, v in summary[name].items() if k not in ("tail", "log_tail", "table", "killed")}
            print(f"{name:<16} {summary[name]['status'].upper()}  {json.dumps(brief)[:300]}")
    failed = summary["failed"]
    print(f"gpu_check: {'FAILED: ' + ', '.join(failed) if failed else 'all parts passed'}"
          f"{' (skipped: ' + ', '.join(summary['skipped']) + ')' if summary['skipped'] else ''}; summary in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
