"""python -m job.preflight: a pass/fail table from rank 0, non-zero exit on any failure."""

from tests.conftest import TINY, run_job


def test_two_ranks_pass(tmp_path):
    result = run_job(["data.source=synthetic", "mlflow.enabled=false", f"train.out_dir={tmp_path / 'out'}"],
                     nproc=2, module="job.preflight", torchrun=())  # as sbatch and the pods run it
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["check", "rank", "result", "detail"]
    for check in ("rendezvous", "all-reduce", "devices", "data", "out_dir", "start", "mlflow"):
        assert any(line.startswith(check) and " pass " in line for line in lines), check
    assert "world_size 2" in result.stdout and "bus bandwidth" in result.stdout and "rank 1: " in result.stdout
    assert lines[-1] == "preflight: all checks passed"
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".owner"]  # the probe file is gone; the lock's stays
    assert (tmp_path / "out" / ".owner").read_text() == ""


def test_failures_are_listed_and_exit_non_zero(tmp_path):
    (tmp_path / "file").write_text("")
    result = run_job(["data.source=cifar10", f"data.root={tmp_path / 'nodata'}", "mlflow.tracking_uri=http://127.0.0.1:9",
                      f"train.out_dir={tmp_path / 'file' / 'out'}"], module="job.preflight")
    assert result.returncode == 1
    fails = [line for line in result.stdout.splitlines() if " FAIL " in line]
    assert [line.split()[0] for line in fails] == ["data", "out_dir", "start", "mlflow"]
    assert "python -m job.data download" in fails[0]
    assert result.stdout.splitlines()[-1] == "preflight: FAILED"


def test_bad_config_is_one_line(tmp_path):
    result = run_job([*TINY, "train.epochz=1"], module="job.preflight")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown key train.epochz — did you mean train.epochs?"


def test_start_checks_are_job_trains_own(tmp_path):
    """What job.train would refuse at start, preflight fails on: a busy out_dir, a resume it cannot honour."""
    from tests.conftest import kill_tree, start_job, wait_until

    out = tmp_path / "out"
    args = [*TINY, "train.epochs=2", f"train.out_dir={out}"]
    assert run_job([*args, "train.stop_after_epochs=1"]).returncode == 0
    ok = run_job(args, module="job.preflight")
    assert ok.returncode == 0 and f"resumes {out}/checkpoints/last.pt" in ok.stdout
    changed = run_job([*args, "train.lr=0.3"], module="job.preflight")
    (line,) = [x for x in changed.stdout.splitlines() if x.startswith("start")]
    assert changed.returncode == 1 and " FAIL " in line and "train.lr 0.05 -> 0.3" in line
    busy = start_job([*TINY, "train.epochs=40", f"train.out_dir={tmp_path / 'busy'}"])
    try:
        wait_until(lambda: (tmp_path / "busy" / "metrics.jsonl").exists(), proc=busy, what="the job to train")
        result = run_job([*TINY, f"train.out_dir={tmp_path / 'busy'}"], module="job.preflight")
    finally:
        kill_tree(busy.pid)
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("start")]
    assert result.returncode == 1 and f"is in use by pid {busy.pid}" in line
