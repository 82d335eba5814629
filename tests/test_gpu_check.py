"""bench/gpu_check.py as the first GPU run will use it, proven on the CPU: every part end to end (--quick), a part
that overruns (killed with every process under it, the rest still run, the summary written at once), the sync
audit's counting, and what the device image must hold (torch, torchvision, pyyaml, psutil, pytest)."""

import json
import os
import subprocess
import sys
import time
import warnings

import psutil
import pytest
import torch

from bench import gpu_parts
from job import averaging, loop
from job.steps import StepEnd
from tests.conftest import ROOT, TINY, job_env, kill_tree, read_metrics

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def gpu_check(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--quick", *args]


@pytest.mark.slow
def test_gpu_check_runs_every_part_end_to_end_in_cpu_quick_mode(tmp_path):
    """As CI can run it: CUDA tests (skipped here), the loop's sync audit, the bench harness; compile parts are
    left out in --quick, fast_recipe without --data-root, and the summary says so."""
    out = tmp_path / "check.json"
    slack = ["--limit", "sync_audit=150", "--limit", "bench_eager=200"]  # a busy 2-core CI machine, not a GPU's host
    done = subprocess.run(gpu_check(*slack, "--out", str(out)), cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=ENV)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["machine"]["device"] == "cpu" and summary["failed"] == summary["timed_out"] == []
    assert summary["skipped"] == {"bench_compile": "--quick: eager only", "bench_cudagraphs": "--quick: eager only",
                                  "fast_recipe": "no --data-root"}
    assert summary["cuda_tests"]["ok"] and "skipped" in summary["cuda_tests"]["summary"]
    audit = summary["sync_audit"]
    assert audit["ok"] and audit["steps"] == 4 and "train.ema_decay=0.99" in audit["options"]
    assert summary["bench"]["job_images_per_sec"]["eager"] > 0
    assert summary["bench"]["bare_step_images_per_sec"]["eager"] > 0
    assert all(summary[p]["status"] == "ok" and summary[p]["wall_s"] <= summary[p]["limit_s"]
               for p in ("cuda_tests", "sync_audit", "bench_eager"))
    assert done.stdout.strip().splitlines()[-1] == (
        f"gpu_check: all parts passed (skipped: bench_compile, bench_cudagraphs, fast_recipe); summary in {out}")
    if not torch.cuda.is_available():
        refused = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, capture_output=True, text=True,
                                 timeout=120, env=ENV)
        assert refused.returncode == 2 and refused.stderr.strip().startswith("error: --device cuda but CUDA is not")


def alive(tag: str) -> list[int]:
    """Processes (not zombies) whose command line holds tag."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if tag in (p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p.pid)
    return found


@pytest.mark.slow
def test_an_overrunning_part_is_killed_with_every_process_under_it_and_the_next_part_runs(tmp_path):
    """GPU_CHECK_OVERRUN makes cuda_tests hang past a 5 s limit, leaving a process in its group, one in a session of
    its own and a daemon; the summary says so as soon as it is killed, none of them survives, sync_audit runs."""
    out = tmp_path / "check.json"
    proc = subprocess.Popen(gpu_check("--parts", "cuda_tests,sync_audit", "--limit", "cuda_tests=5", "--out",
                                      str(out)), cwd=ROOT, env={**ENV, "GPU_CHECK_OVERRUN": "cuda_tests"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline, snapshot = time.monotonic() + 120, {}
        while "cuda_tests" not in snapshot and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            snapshot = json.loads(out.read_text()) if out.exists() else {}
        assert "cuda_tests" in snapshot, "no summary after the overrun"
        assert "sync_audit" not in snapshot  # written when the part was killed, before the next one ended
        part = snapshot["cuda_tests"]
        assert part["status"] == "timed_out" and snapshot["timed_out"] == ["cuda_tests"] and part["limit_s"] == 5
        tag = f"overrun-of-{part['killed'][0]['pid']}"  # the part's own process comes first
        sleepers = [k for k in part["killed"] if k["cmd"].endswith(tag)]
        assert len(sleepers) == 3 and len({k["sid"] for k in part["killed"]}) == 3  # three sessions
        assert alive(tag) == []
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 1, stdout[-2000:] + stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["failed"] == summary["timed_out"] == ["cuda_tests"]
    assert summary["sync_audit"]["status"] == "ok" and summary["sync_audit"]["steps"] == 4
    assert "gpu_check: FAILED: cuda_tests" in stdout and "cuda_tests       TIMED_OUT" in stdout
    assert alive(tag) == []


@pytest.mark.filterwarnings("ignore:called a synchronizing")  # the warm-up epoch's fake one, not recorded
def test_the_sync_audit_fails_on_a_sync_in_any_step_and_allows_the_epochs_edges(monkeypatch):
    """On the CPU nothing syncs; a fake sync warning, as torch.cuda.set_sync_debug_mode('warn') raises one, stands
    in: in the audited epoch's third step it fails the audit, after the last step (the epoch's sums) it does not.
    Both averagers' runs are audited: the EMA run has the step's fake sync, the Lookahead run one at each average."""
    sync = "called a synchronizing CUDA operation"
    clean = gpu_parts.sync_audit(device="cpu", steps=4, width=8)
    assert clean["ok"] and clean["steps"] == 4 and clean["syncs_in_steps"] == clean["syncs_at_epoch_edges"] == 0
    assert set(clean["averagers"]) == {"average", "lookahead"} and all(r["steps"] == 4 for r in clean["averagers"].values())

    calls, step = [], loop.train_step

    def syncing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4 + 3:  # the warm-up epoch's 4 steps, then the audited epoch's third
            warnings.warn(sync)
        return step(*args, **kwargs)

    lookahead_update = averaging.Lookahead.update

    def syncing_update(self, step, total_steps):  # a fake sync each time Lookahead averages and copies back
        if step % self.every == 0:
            warnings.warn(sync)
        return lookahead_update(self, step, total_steps)

    monkeypatch.setattr(loop, "train_step", syncing_step)
    monkeypatch.setattr(averaging.Lookahead, "update", syncing_update)
    monkeypatch.setattr(StepEnd, "epoch_end", lambda *a, **k: warnings.warn(sync))  # after the last step
    audit = gpu_parts.sync_audit(device="cpu", steps=4, width=8)
    assert not audit["ok"] and audit["syncs_in_steps"] == 3 and audit["first_syncs"][0].startswith("average step 3: ")
    average, lookahead = audit["averagers"]["average"], audit["averagers"]["lookahead"]
    assert not average["ok"] and average["steps_with_syncs"] == [3] and average["syncs_in_steps"] == 1
    # Lookahead (every 2 steps) averages inside the audited steps: its fake syncs are in steps 2 and 4
    assert not lookahead["ok"] and lookahead["steps_with_syncs"] == [2, 4] and lookahead["steps"] == 4
    assert "train.ema_mode=lookahead" in lookahead["options"] and "train.ema_decay=0.99" in average["options"]
    assert audit["syncs_at_epoch_edges"] == 2  # each run's epoch end: allowed


def test_gpu_check_names_what_it_needs_and_the_line_that_installs_it(tmp_path):
    code = ("import sys; sys.modules['yaml'] = sys.modules['psutil'] = None\n"
            "from bench import gpu_check\n"
            f"sys.exit(gpu_check.main(['--device', 'cpu', '--quick', '--out', {str(tmp_path / 'c.json')!r}]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: gpu_check needs pyyaml, psutil, not installed here; on an image with torch "
                                   "and torchvision: pip install pyyaml psutil pytest")
    assert json.loads((tmp_path / "c.json").read_text())["missing"] == ["pyyaml", "psutil"]


def test_training_needs_neither_matplotlib_nor_tqdm_nor_mlflow(tmp_path):
    """The GPU image has torch and torchvision only: a run at a terminal (tqdm's place) with those three blocked
    trains, tests and writes its records; the figures are left out with one warning."""
    out = tmp_path / "out"
    code = ("import io, sys\n"
            "for name in ('matplotlib', 'tqdm', 'mlflow'):\n"
            "    sys.modules[name] = None\n"
            "class Terminal(io.TextIOWrapper):\n"
            "    def isatty(self):\n"
            "        return True\n"
            "sys.stdout = Terminal(sys.stdout.buffer, line_buffering=True)\n"
            "from job import train\n"
            f"sys.exit(train.main({[*TINY, 'train.epochs=1', f'train.out_dir={out}']!r}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=job_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_metrics(out)[-1]["test_acc"] > 0
    assert "warning: no figures: matplotlib is not installed (pip install matplotlib)" in done.stderr
    assert not list(out.glob("*.png"))
