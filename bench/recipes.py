"""python -m bench.recipes PLAN[,PLAN] --data-root DIR --out DIR [--parallel N] [--budget-s S] [key=value ...]
   python -m bench.recipes --summary OUT/summary.json [--plot FILE.png]      (the table and curves again)

Trains the runs of one or more plans as `python -m job.train` child processes, N at a time, on whatever device
`train.device` picks, then writes OUT/summary.json (each run's per-epoch history, test accuracy, wall time,
images/s) and prints a table of dev-test accuracy mean ± std per arm. Trailing key=value overrides reach every
run (e.g. `mlflow.enabled=false train.device=cuda`). At --budget-s the runs still going get SIGTERM (they
checkpoint and stop) and count as partial; runs not started are listed as such. Plans:

  w32      every recipe choice at width 32 on a short schedule (20,000 training images, 6 epochs, batch 256,
           one-cycle, bf16), one arm per choice, 3 seeds each (issue "Accuracy, measured")
  fast     full width: configs/fast.yaml, and the same at batch 256, 3 seeds each
  fast-sweep  full width: configs/fast.yaml at batch 64-256, lr 0.2, weight decay 2e-4, 3 seeds each
  proxy    the fast-training methods of issue 19 ranked on a CPU: width 16, 8,000 training images, 4 epochs,
           batch 128, one-cycle, flip TTA (fast.yaml's recipe, small), one arm per method, 3 seeds each
  proxy-combined  the same base with every method that did not lose there, together (3 seeds)
  methods  the same arms at full width on a GPU: the short schedule (15 epochs, one-cycle) plus each method, and
           configs/fast.yaml (all of them, arm fast-combined), 3 seeds each
  default  full width: the defaults at 60 epochs (the candidate length for job/config.py), seed 0

The table's delta column is the mean ± std over seeds of (arm - the plan's base arm) for the same seed: a seed
fixes the initialisation and the data order, so paired differences are less noisy than the means' difference.
"""

import argparse
import fnmatch
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.child import child_env
from bench.common import ROOT
from job import records

W32 = ["data.val_size=2000", "data.train_subset=20000", "model.width=32", "train.epochs=6", "train.batch_size=256",
       "train.lr=0.1", "train.ref_batch_size=128", "train.schedule=onecycle", "train.warmup_epochs=1",
       "train.precision=bf16", "train.tta=none"]  # the base as measured: TTA is an arm of its own
W32_ARMS = {  # arm: what it changes from the base (lr follows the batch by train.ref_batch_size)
    "base": [], "tta-flip": ["train.tta=flip"], "ema-0.99": ["train.ema_decay=0.99"],
    "mixup-cutmix": ["data.mixup_alpha=0.2", "data.cutmix_alpha=1.0"],
    "no-label-smoothing": ["train.label_smoothing=0"],
    "cosine": ["train.schedule=cosine"], "batch-128": ["train.batch_size=128"], "batch-512": ["train.batch_size=512"],
}
METHODS = {  # issue 19's fast-training methods, each on its own against the plan's base
    "base": [], "reflect-pad": ["data.pad_mode=reflect"], "translate-2": ["data.crop_padding=2"],
    "alternate-flip": ["data.flip=alternate"], "zero-init-residual": ["model.zero_init_residual=true"],
    "bn-momentum-0.4": ["model.bn_momentum=0.4"], "bn-bias-lr-x8": ["train.bn_bias_lr_mult=8"],
    "whiten-stem": ["train.whiten_stem=true"], "tta-multicrop": ["train.tta=multicrop"],
    "label-smoothing-0.2": ["train.label_smoothing=0.2"],
    "ema-0.99": ["train.ema_decay=0.99"],
    "lookahead": ["train.ema_decay=0.95", "train.ema_mode=lookahead", "train.ema_every_steps=5"],
    "all-data": ["data.val_size=0"],  # trains on the validation images too (5,000 more at full size)
}
PROXY = ["data.val_size=2000", "data.train_subset=8000", "data.test_subset=5000", "model.width=16", "train.epochs=4",
         "train.batch_size=128", "train.lr=0.1", "train.ref_batch_size=128", "train.schedule=onecycle",
         "train.warmup_epochs=0.5", "train.tta=flip"]
PROXY_ARMS = {**METHODS, "all-data": ["data.val_size=0", "data.train_subset=10000"]}  # + the 2,000 it held out
# every method that did not lose in the proxy plan (2026-12-03, BENCHMARKS.md), together: fast.yaml's candidate
COMBINED = ["data.pad_mode=reflect", "data.crop_padding=2", "data.flip=alternate", "train.whiten_stem=true",
            "train.label_smoothing=0.2", "train.bn_bias_lr_mult=8", "train.ema_decay=0.95", "train.ema_mode=lookahead",
            "train.ema_every_steps=5", "train.tta=multicrop"]
FAST = ["--config", "configs/fast.yaml"]
SHORT = ["train.epochs=15", "train.schedule=onecycle", "train.warmup_epochs=2"]  # fast.yaml without the methods
FAST_SWEEP = {  # configs/fast.yaml at full width with fewer images per step, a higher lr, less weight decay
    "fast-b128": ["train.batch_size=128"], "fast-b128-lr0.2": ["train.batch_size=128", "train.lr=0.2"],
    "fast-b64": ["train.batch_size=64"], "fast-b256-lr0.2": ["train.batch_size=256", "train.lr=0.2"],
    "fast-b128-wd2e-4": ["train.batch_size=128", "train.weight_decay=2e-4"],
}


@dataclass
class Run:
    arm: str
    seed: int
    args: list[str]
    status: str = "not run"  # finished | partial (stopped at the budget) | failed | not run
    returncode: int | None = None
    wall_s: float | None = None
    epochs_done: int = 0
    best_val_acc: float | None = None
    test_acc: float | None = None
    images_per_sec: float | None = None  # median over epochs after the first
    history: list[dict] = field(default_factory=list)
    log_tail: str = ""

    @property
    def name(self) -> str:
        return f"{self.arm}-s{self.seed}"


PLANS = ("default", "fast", "fast-sweep", "w32", "proxy", "proxy-combined", "methods")


def plan(names: list[str]) -> list[Run]:
    """The runs in launch order: seed 0 of every arm before any seed 1 (a budget cut leaves whole comparisons)."""
    runs = []
    for name in names:
        if name == "default":  # the defaults at the length the field's evidence points to (60-80 epochs)
            runs += [Run("default-60ep", 0, ["train.epochs=60"])]
        elif name == "fast":
            runs += [Run(arm, seed, FAST + extra) for seed in range(3)
                     for arm, extra in {"fast": [], "fast-batch-256": ["train.batch_size=256"]}.items()]
        elif name == "fast-sweep":
            runs += [Run(arm, seed, FAST + extra) for seed in range(3) for arm, extra in FAST_SWEEP.items()]
        elif name == "w32":
            runs += [Run(f"w32-{arm}", seed, W32 + extra) for seed in range(3) for arm, extra in W32_ARMS.items()]
        elif name == "proxy":
            runs += [Run(f"proxy-{arm}", seed, PROXY + extra) for seed in range(3) for arm, extra in PROXY_ARMS.items()]
        elif name == "proxy-combined":
            runs += [Run("proxy-combined", seed, PROXY + COMBINED) for seed in range(3)]
        elif name == "methods":  # each method on the short schedule alone, and all of them: fast.yaml itself
            arms = {**{arm: SHORT + extra for arm, extra in METHODS.items()}, "combined": FAST}
            runs += [Run(f"fast-{arm}", seed, args) for seed in range(3) for arm, args in arms.items()]
        else:
            raise SystemExit(f"error: unknown plan {name!r} (choose from {', '.join(PLANS)})")
    return sorted(runs, key=lambda run: run.seed)


def read_metrics(run: Run, out_dir: Path) -> None:
    """The run's epochs, best validation accuracy, speed and test accuracy, from its out_dir's metrics.jsonl."""
    found = records.read(out_dir)
    run.history = found.epochs
    run.epochs_done = len(run.history)
    if run.history:
        vals = [r["val_acc"] for r in run.history if r["val_acc"] is not None]  # none without a validation split
        run.best_val_acc = max(vals) if vals else None
        speeds = [r["images_per_sec"] for r in run.history[1:]] or [run.history[0]["images_per_sec"]]
        run.images_per_sec = statistics.median(speeds)
    if found.final:
        run.test_acc = found.final["test_acc"]


def launch(run: Run, out: Path, overrides: list[str], threads: int) -> subprocess.Popen:
    out_dir = out / "runs" / run.name
    cmd = [sys.executable, "-m", "job.train", *run.args, f"train.seed={run.seed}", f"train.out_dir={out_dir}",
           f"mlflow.run_name={run.name}", *overrides]
    env = child_env(threads, out / "runs" / f"{run.name}.inductor-cache")
    if os.environ.get("MLFLOW_TRACKING_URI"):  # child_env drops it (bench measures untracked); runs here may want it
        env["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
    log = open(out / "runs" / f"{run.name}.log", "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.started, proc.log = time.monotonic(), log
    return proc


def finish(run: Run, proc: subprocess.Popen, out: Path, stopped: bool) -> None:
    proc.log.close()
    run.returncode, run.wall_s = proc.returncode, round(time.monotonic() - proc.started, 1)
    read_metrics(run, out / "runs" / run.name)
    # 0, or 3 (trained and tested; MLflow incomplete): the accuracy is in metrics.jsonl either way
    run.status = ("finished" if run.returncode in (0, 3) and run.test_acc is not None
                  else "partial" if stopped and run.returncode in (143, -signal.SIGTERM, -signal.SIGKILL)
                  else "failed")
    if run.status == "failed":
        run.log_tail = "\n".join((out / "runs" / f"{run.name}.log").read_text(errors="replace").splitlines()[-15:])
    print(f"[{time.strftime('%H:%M:%S')}] {run.name}: {run.status} (exit {run.returncode}, {run.wall_s} s, "
          f"{run.epochs_done} epochs, test {run.test_acc})", file=sys.stderr, flush=True)


def execute(runs: list[Run], out: Path, overrides: list[str], parallel: int, budget_s: float, threads: int) -> None:
    (out / "runs").mkdir(parents=True, exist_ok=True)
    pending, running = list(runs), {}
    deadline, stopping = time.monotonic() + budget_s, False
    while pending or running:
        if not stopping and time.monotonic() > deadline:
            stopping = True
            for proc in running.values():
                os.killpg(proc.pid, signal.SIGTERM)  # the job checkpoints and exits 143
            kill_at = time.monotonic() + 60
        if stopping and time.monotonic() > kill_at:
            for proc in running.values():
                os.killpg(proc.pid, signal.SIGKILL)
        while not stopping and pending and len(running) < parallel:
            run = pending.pop(0)
            running[run.name] = launch(run, out, overrides, threads)
            print(f"[{time.strftime('%H:%M:%S')}] {run.name}: started", file=sys.stderr, flush=True)
        for run in [r for r in runs if r.name in running]:
            proc = running[run.name]
            if proc.poll() is not None:
                finish(run, proc, out, stopping)
                del running[run.name]
        if stopping:
            pending.clear()
        time.sleep(1)


def paired_delta(runs: list[Run], arm: str) -> str:
    """Mean ± std over seeds of arm's test accuracy minus its plan's base arm's at the same seed, in points."""
    base = f"{arm.split('-', 1)[0]}-base"  # proxy-lookahead -> proxy-base
    if base == arm:
        return "-"
    tests = {(r.arm, r.seed): r.test_acc for r in runs if r.status == "finished"}
    deltas = [100 * (tests[arm, s] - tests[base, s]) for a, s in tests if a == arm and (base, s) in tests]
    if not deltas:
        return "-"
    return f"{statistics.mean(deltas):+.2f}" + (f" ± {statistics.stdev(deltas):.2f}" if len(deltas) > 1 else "")


def table(runs: list[Run]) -> str:
    rows = ["| arm | runs finished | dev-test acc, mean ± std | delta vs base, points (paired) | min - max "
            "| best val acc (mean) | epochs | img/s (median) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm in dict.fromkeys(r.arm for r in runs):
        group = [r for r in runs if r.arm == arm]
        done = [r for r in group if r.status == "finished"]
        tests = [r.test_acc for r in done]
        mean_std = (f"{statistics.mean(tests):.4f} ± {statistics.stdev(tests):.4f}" if len(tests) > 1
                    else f"{tests[0]:.4f}" if tests else "-")
        spread = f"{min(tests):.4f} - {max(tests):.4f}" if tests else "-"
        vals = [r.best_val_acc for r in done]
        speeds = [r.images_per_sec for r in group if r.images_per_sec]
        epochs = "/".join(str(r.epochs_done) for r in group)
        vals = [v for v in vals if v is not None]  # a run without a validation split (data.val_size=0)
        rows.append(f"| {arm} | {len(done)} of {len(group)} | {mean_std} | {paired_delta(runs, arm)} | {spread} | "
                    f"{statistics.mean(vals) if vals else float('nan'):.4f} | {epochs} | "
                    f"{statistics.median(speeds) if speeds else float('nan'):.0f} |")
    return "\n".join(rows)


def plot(runs: list[Run], path: Path) -> None:
    """Validation accuracy per epoch of each arm's finished runs (mean, min-max band): job.report's figure."""
    from job.report import plot as draw

    rows = []
    for arm in dict.fromkeys(r.arm for r in runs):
        done = [r for r in runs if r.arm == arm and r.status == "finished"]
        if done:
            rows.append({"recipe": arm, "differs_in": {}, "test_acc_mean": statistics.mean(r.test_acc for r in done),
                         "val_acc_curves": [[h["val_acc"] for h in r.history] for r in done]})
    draw(rows, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.recipes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plans", nargs="?", help=f"comma-separated: {', '.join(PLANS)} (with MLflow on, "
                        "give parallel runs a tracking server: mlflow.tracking_uri=http://...)")
    parser.add_argument("--data-root", help="data.root of every run (e.g. the dev split)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--summary", type=Path, action="append",
                        help="print the table of an earlier run's summary.json (repeatable), run nothing")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="also draw the validation curves per arm")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="stop everything after this long")
    parser.add_argument("--only", default="", help="comma-separated arms to keep, * as a wildcard (default: all)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds to run (default: all three)")
    parser.add_argument("overrides", nargs="*", help="key=value for every run")
    args = parser.parse_intermixed_args(argv)
    keep = (lambda run: any(fnmatch.fnmatch(run.arm, p) for p in args.only.split(","))) if args.only else bool
    if args.summary:
        runs = []
        for path in args.summary:
            summary = json.loads(path.read_text())
            runs += [run for run in (Run(**r) for r in summary["runs"]) if keep(run)]
            print(f"{path}: {summary['machine']}, torch {summary['torch']}, {summary['parallel']} runs at a time, "
                  f"started {summary['started']}")
        print(f"\n{table(runs)}")
        if args.plot:
            plot(runs, args.plot)
        return 0
    if not (args.plans and args.data_root and args.out):
        parser.error("PLAN, --data-root and --out are needed to run (or --summary to print an earlier table)")
    runs = [run for run in plan(args.plans.split(",")) if keep(run)]
    runs = [r for r in runs if str(r.seed) in args.seeds.split(",")]
    overrides = [f"data.root={args.data_root}", "data.verify=false", *args.overrides]
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    execute(runs, args.out, overrides, args.parallel, args.budget_s, args.threads)
    import torch

    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{os.cpu_count()}"
    summary = {"started": started, "machine": machine, "torch": torch.__version__, "overrides": overrides,
               "parallel": args.parallel, "runs": [asdict(r) for r in runs]}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{machine}, torch {torch.__version__}, {args.parallel} runs at a time, started {started}\n")
    print(table(runs))
    if args.plot:
        plot(runs, args.plot)
    return 0 if all(r.status in ("finished", "partial", "not run") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
