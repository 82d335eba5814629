"""python -m bench [--quick] [--steps N] [--batch B] [--modes eager,channels_last,...] [--out FILE]

Runs every part in child processes of this one, one after another, then prints a markdown table (stdout)
and writes every figure to a JSON file. Progress goes to stderr.
"""

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench import jobrun, report
from bench.child import child_env, run_child
from bench.common import MODE_TOKENS, Mode, machine, now

DEFAULT_MODES = {
    "cpu": "eager,channels_last,bf16,compile,compile+channels_last,compile+channels_last+fused,"
           "compile+channels_last+malloc_cache",
    "cuda": "eager,channels_last,bf16+channels_last,compile+bf16+channels_last,compile+bf16+channels_last+fused,"
            "compile:reduce-overhead+bf16+channels_last",  # CUDA graphs (bare step only)
}
QUICK_MODES = "eager"
SIZES = {  # batch 512 and width 64 are the job's defaults; quick is for checking the harness, not for reading
    "full": {"batch": 512, "steps": 5, "warmup": 3, "epochs": 3, "augment_steps": 30, "width": 64},
    "quick": {"batch": 8, "steps": 2, "warmup": 1, "epochs": 2, "augment_steps": 5, "width": 8},
}
PARTS = ("baseline", "augment", "bare_step", "job", "ddp")


@dataclass
class Plan:
    """Sizes of every part. job.train runs `epochs` epochs of `steps` steps; its first epoch is warm-up."""

    device: str
    modes: list[str]
    batch: int
    steps: int
    warmup: int
    epochs: int
    augment_batch: int
    augment_steps: int
    ddp_steps: int
    width: int
    """model.width of job.train and the bare step (the seed-style baseline is the seed's, always 64)."""
    threads: int | None
    timeout_s: float
    quick: bool


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[2])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness in < 90 s; not a measurement")
    p.add_argument("--steps", type=int,
                   help="timed steps of each part (job.train: steps per epoch); default 5, quick 2")
    p.add_argument("--batch", type=int, help="global batch of the baseline, job.train and the bare step; "
                                             "default 512 (the job's), quick 8")
    p.add_argument("--modes", help=f"comma-separated; each mode is '+'-joined tokens ({MODE_TOKENS}); "
                                   f"default per device: {DEFAULT_MODES}")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every child (default: inherited)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed to each child process")
    p.add_argument("--out", default="bench-results.json", help="JSON file of every figure")
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    modes = (args.modes or (QUICK_MODES if args.quick else DEFAULT_MODES[device])).split(",")
    for name in modes:
        Mode.parse(name)  # fail now, not after an hour
    size = SIZES["quick" if args.quick else "full"]
    steps = args.steps or size["steps"]
    return Plan(device=device, modes=modes, batch=args.batch or size["batch"], steps=steps, warmup=size["warmup"],
                epochs=size["epochs"], augment_batch=512, augment_steps=size["augment_steps"], ddp_steps=steps,
                width=size["width"],
                threads=args.threads, timeout_s=args.timeout, quick=args.quick)


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class Runner:
    """Runs the worker parts as child processes in one scratch directory."""

    def __init__(self, plan: Plan, workdir: Path):
        self.plan, self.workdir, self.count = plan, workdir, 0

    def worker(self, part: str, **params) -> dict:
        self.count += 1
        out = self.workdir / f"{self.count:02d}-{part}.json"
        cmd = [sys.executable, "-m", "bench.worker", part,
               json.dumps({**params, "device": self.plan.device}), str(out)]
        child = run_child(cmd, child_env(self.plan.threads, self.workdir / f"{self.count:02d}-inductor-cache"),
                          out.with_suffix(".log"), self.plan.timeout_s)
        if child.returncode != 0:
            return {"error": f"bench.worker {part} exited {child.returncode}", "log_tail": child.log[-3000:]}
        result = json.loads(out.read_text())
        return {**result, "peak_rss_mib": child.peak_rss_mib, "wall_s": child.wall_s}

    def job(self, mode: str) -> dict:
        p = self.plan
        return jobrun.run_job(Mode.parse(mode), batch=p.batch, steps=p.steps, epochs=p.epochs, device=p.device,
                              workdir=self.workdir, width=p.width, threads=p.threads, timeout_s=p.timeout_s)


def run_parts(plan: Plan, parts: set[str], workdir: Path) -> dict:
    """Every requested part, in order; a part that fails is recorded with its error and the rest go on."""
    runner = Runner(plan, workdir)
    p = plan
    results = {}
    if "baseline" in parts:
        say(f"(a) baseline: seed model, PIL + DataLoader, batch {p.batch}, num_workers 0 and 1")
        results["baseline"] = runner.worker("baseline", batch=p.batch, steps=p.steps, warmup=p.warmup)
        say(f"    {report.ips(results['baseline'])}")
    if "augment" in parts:
        say(f"(d) augmentation, batch {p.augment_batch}")
        results["augment"] = runner.worker("augment", batch=p.augment_batch, steps=p.augment_steps, warmup=2)
        say(f"    {report.ips(results['augment'])}")
        if "error" not in results["augment"]:  # the same with glibc keeping freed memory (mode token malloc_cache)
            results["augment"]["malloc_cache"] = runner.worker("augment", batch=p.augment_batch,
                                                               steps=p.augment_steps, warmup=2, malloc_cache=True)
            say(f"    with malloc_cache: {report.ips(results['augment']['malloc_cache'])}")
    if "bare_step" in parts:
        results["bare_step"] = {}
        for mode in p.modes:
            say(f"(c) bare model step, {mode}")
            results["bare_step"][mode] = runner.worker("bare_step", mode=mode, batch=p.batch, steps=p.steps,
                                                       warmup=p.warmup, width=p.width)
            say(f"    {report.ips(results['bare_step'][mode])}")
    if "job" in parts:
        results["job"] = {}
        for mode in p.modes:
            say(f"(b) job.train end to end, {mode}: {p.epochs} epochs of {p.steps} steps")
            results["job"][mode] = runner.job(mode)
            say(f"    {report.ips(results['job'][mode])}")
    if "ddp" in parts:
        mode = next((m for m in p.modes if Mode.parse(m).job_overrides() is not None), "eager")
        say(f"DDP scaling on the CPU, {mode}: 1 process x 1 thread, 1 x 2 threads, torchrun 2 x 1 thread")
        results["ddp"] = jobrun.ddp_scaling(Mode.parse(mode), batch=p.batch, steps=p.ddp_steps, epochs=p.epochs,
                                            workdir=workdir, width=p.width, timeout_s=p.timeout_s)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    parts = set(args.parts.split(","))
    unknown = parts - set(PARTS)
    if unknown:
        print(f"error: unknown part(s) {', '.join(sorted(unknown))}; parts: {', '.join(PARTS)}", file=sys.stderr)
        return 2
    info = machine(torch.device(plan.device))
    say(f"{info['cpu']}, {info['cpus_usable']} CPUs, torch {info['torch']}, {info['torch_threads']} threads, "
        f"device {plan.device}; load average {info['load_average_at_start'][0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        results = run_parts(plan, parts, Path(tmp))
    info["load_average_at_end"] = list(os.getloadavg())
    doc = {"date": now(), "machine": info, "settings": asdict(plan), **results}
    doc.update(report.derived(doc))
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(report.markdown(doc))
    say(f"wrote {args.out}")
    return 1 if report.errors(doc) else 0


if __name__ == "__main__":
    sys.exit(main())
