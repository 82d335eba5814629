"""The benchmark harness: `python -m bench --quick` writes every section with positive figures, and its parts
measure what they say. No speed thresholds: speed targets are benchmark figures, not test assertions."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import baseline, report, seed, steps
from bench.child import run_child
from bench.common import Mode, summarize
from job import loop
from tests.conftest import ROOT, TINY


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def test_baseline_trains_the_seeds_classes_and_the_bare_step_is_the_jobs():
    assert baseline.SENet is seed.SENet  # bench/seed.py, checked against the notebook in tests/test_model.py
    imported = {node.module for node in ast.walk(ast.parse(Path(baseline.__file__).read_text()))
                if isinstance(node, ast.ImportFrom)}
    assert {m for m in imported if m.startswith(("job", "senet"))} == {"job.clock", "job.synthetic"}  # no model or step
    assert steps.train_step is loop.train_step and steps.AUTOCAST is loop.AUTOCAST


def test_modes_parse_and_map_to_the_jobs_config_keys():
    mode = Mode.parse("compile+channels_last+bf16")
    assert (mode.compile, mode.channels_last, mode.precision, mode.optimizer) == ("default", True, "bf16", "default")
    assert mode.job_overrides() == ["train.channels_last=true", "train.precision=bf16", "train.compile=true"]
    assert Mode.parse("eager").job_overrides() == ["train.channels_last=false", "train.precision=fp32",
                                                   "train.compile=false"]
    for bare_only in ("eager+fused", "compile:max-autotune", "malloc_cache"):
        assert Mode.parse(bare_only).job_overrides() is None  # job.train has no key for these
    with pytest.raises(ValueError, match="unknown token 'chanels_last'"):
        Mode.parse("chanels_last")


def test_summarize_takes_the_median_after_warmup():
    out = summarize([9.0, 1.0, 3.0, 2.0], warmup=1, batch=4)
    assert out["step_s_median"] == 2.0 and out["images_per_sec"] == 2.0 and out["first_step_s"] == 9.0


def test_run_child_reports_peak_rss_and_when_a_file_appeared(tmp_path):
    marker = tmp_path / "marker"
    code = (f"import time; time.sleep(0.3); open({str(marker)!r}, 'w').close(); "
            f"b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.2)")
    child = run_child([sys.executable, "-c", code], dict(os.environ), tmp_path / "log", 60, watch=marker)
    assert child.returncode == 0
    assert child.peak_rss_mib > 300
    assert 0.25 < child.watch_s < child.wall_s
    timed_out = run_child([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ),
                          tmp_path / "log2", 0.5)
    assert timed_out.returncode == 124 and timed_out.wall_s < 30


def test_ratios_and_the_fastest_mode_come_from_the_parts():
    doc = {"settings": {"modes": ["eager", "compile"]}, "baseline": {"images_per_sec": 50.0},
           "job": {"eager": {"images_per_sec": 55.0, "wall_s": 1, "launch_to_train_start_s": 4.0},
                   "compile": {"images_per_sec": 70.0, "wall_s": 1, "launch_to_train_start_s": 30.0}},
           "bare_step": {"eager": {"images_per_sec": 56.0}, "compile": {"images_per_sec": 72.0}},
           "augment": {"images_per_sec": 1e5}}
    out = report.derived(doc)
    assert out["summary"]["fastest_job_mode"] == "compile"
    assert out["summary"]["job_vs_baseline"] == pytest.approx(1.4)
    assert out["ratios"]["eager"]["job_vs_bare_step"] == pytest.approx(55 / 56)
    assert out["summary"]["launch_to_train_start_s_without_compile"] == 4.0


@pytest.mark.slow
def test_quick_run_writes_every_section_with_positive_figures(tmp_path):
    """Every part but bare_step and job, which the GPU check's CPU mode runs through the same harness
    (tests/test_gpu_check.py);
    the ratios between parts are checked on given figures (above)."""
    out = tmp_path / "bench.json"
    # one thread a child (the DDP part sets its own): two would oversubscribe the cores beside the other test worker
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run([sys.executable, "-m", "bench", "--quick", "--parts", "baseline,augment,ddp", "--threads",
                             "1", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
                            check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    doc = json.loads(out.read_text())

    import torch
    assert doc["date"] and doc["machine"]["torch"] == torch.__version__ and doc["machine"]["torch_threads"] >= 1
    modes = doc["settings"]["modes"]
    assert modes and doc["settings"]["quick"] is True
    for run in doc["baseline"]["runs"].values():  # (a), with num_workers 0 and 1
        assert _positive(run["images_per_sec"]) and _positive(run["loader_images_per_sec"])
    assert _positive(doc["baseline"]["images_per_sec"]) and _positive(doc["baseline"]["peak_rss_mib"])
    for aug in (doc["augment"], doc["augment"]["malloc_cache"]):  # (d), as the job is and with malloc_cache
        assert _positive(aug["images_per_sec"]) and _positive(aug["job_data_path_images_per_sec"])
    for run in doc["ddp"]["runs"].values():
        assert _positive(run["images_per_sec"]) and _positive(run["peak_rss_mib"])
    assert doc["ddp"]["runs"]["2proc_1thread"]["nproc"] == 2
    assert _positive(doc["ddp"]["speedup_2proc_vs_1proc_2threads"])
    assert f"| {modes[0]} |" in result.stdout  # the markdown table


@pytest.mark.slow
def test_recipes_trains_each_arm_and_seed_and_reports_mean_and_std(tmp_path):
    """bench.recipes end to end at a tiny size: one job.train child per (arm, seed), the table from their
    metrics.jsonl, the same table again from summary.json; a budget stops a run, which is not counted."""
    # fp32 overrides the arms' bf16, which a CPU without AVX512-BF16 emulates 12x slower (the later value wins)
    tiny = [*TINY, "train.precision=fp32"]
    cmd = [sys.executable, "-m", "bench.recipes", "w32", "--only", "w32-base,w32-tta-flip", "--seeds", "0,1",
           "--data-root", str(tmp_path / "unused"), "--out", str(tmp_path / "rec"), "--parallel", "2",
           "--threads", "1", *tiny, "train.epochs=1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "rec" / "summary.json").read_text())
    runs = {(r["arm"], r["seed"]): r for r in summary["runs"]}
    assert set(runs) == {("w32-base", 0), ("w32-base", 1), ("w32-tta-flip", 0), ("w32-tta-flip", 1)}
    for (arm, n), r in runs.items():
        assert r["status"] == "finished" and r["epochs_done"] == 1 and 0 <= r["test_acc"] <= 1
        config = (tmp_path / "rec" / "runs" / f"{arm}-s{n}" / "config.yaml").read_text()
        assert f"seed: {n}" in config and "width: 8" in config  # the trailing overrides win over the arm's
        assert ("tta: flip" if arm == "w32-tta-flip" else "tta: none") in config
    tests = [runs["w32-base", s]["test_acc"] for s in (0, 1)]
    row = next(line for line in done.stdout.splitlines() if line.startswith("| w32-base |"))
    assert "2 of 2" in row and f"{sum(tests) / 2:.4f} ± " in row
    again = subprocess.run([sys.executable, "-m", "bench.recipes", "--summary", str(tmp_path / "rec" / "summary.json")],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert row in again.stdout.splitlines()

    cut = subprocess.run([*cmd[:cmd.index("--only")], "--only", "w32-base", "--seeds", "0,1",
                          "--data-root", "x", "--out", str(tmp_path / "cut"), "--budget-s", "3", "--parallel", "1",
                          "--threads", "1", *tiny, "train.epochs=50"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert cut.returncode == 0, cut.stderr[-2000:]
    statuses = [r["status"] for r in json.loads((tmp_path / "cut" / "summary.json").read_text())["runs"]]
    assert statuses == ["partial", "not run"]
    assert "| w32-base | 0 of 2 | - |" in cut.stdout


def test_every_arm_of_every_plan_is_a_valid_config():
    """A typo in an arm would fail its runs on the device, minutes into a 15-minute lease: checked here instead."""
    from bench import recipes
    from job import config

    for name in recipes.PLANS:
        for run in recipes.plan([name]):
            path, overrides = (run.args[1], run.args[2:]) if run.args[:1] == ["--config"] else (None, run.args)
            config.load(str(ROOT / path) if path else None, overrides)
    arms = {run.arm for run in recipes.plan(["methods"])}
    assert {f"fast-{arm}" for arm in [*recipes.METHODS, "combined"]} == arms
    assert len(recipes.plan(["methods"])) == 3 * len(arms)
    assert {run.arm for run in recipes.plan(["proxy"])} == {f"proxy-{arm}" for arm in recipes.PROXY_ARMS}


@pytest.mark.slow
def test_the_device_script_runs_its_accuracy_plan_in_tiny_cpu_mode(tmp_path):
    """bench/device.sh as a lent GPU runs it, at a CPU's size: the plan's arms train, the summary lands in $OUT."""
    done = subprocess.run(["bash", "bench/device.sh"], cwd=ROOT, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "TINY": "1", "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    runs = json.loads((tmp_path / "recipes-summary.json").read_text())["runs"]
    assert {(r["arm"], r["status"]) for r in runs} == {
        ("fast-base", "finished"), ("fast-lookahead", "finished"), ("default-60ep", "finished")}
    config = (tmp_path / "recipes" / "runs" / "fast-lookahead-s0" / "config.yaml").read_text()
    assert "ema_mode: lookahead" in config and "epochs: 1" in config  # the arm's key, the tiny override's size
