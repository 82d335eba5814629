"""A stuck rank ends the job within the collective timeout, with an error that names it."""

import time

import psutil

from tests.conftest import TINY, job_env, kill_tree, start_job, wait_until


def test_a_stopped_rank_is_named_instead_of_a_hang(tmp_path):
    out = tmp_path / "out"
    env = job_env(TORCH_ELASTIC_SHUTDOWN_TIMEOUT="5")  # torchrun then SIGKILLs the stuck worker sooner
    proc = start_job([*TINY, "train.epochs=20", "train.timeout_s=10", f"train.out_dir={out}"], nproc=2, env=env)
    try:
        metrics = out / "metrics.jsonl"
        wait_until(lambda: metrics.exists() and metrics.read_text(), timeout=120, proc=proc, what="the first epoch")
        stuck = next(c for c in psutil.Process(proc.pid).children(recursive=True)
                     if c.environ().get("RANK") == "1")
        stuck.suspend()  # SIGSTOP: alive, holding its sockets, answering nothing
        started = time.monotonic()
        _, stderr = proc.communicate(timeout=150)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode != 0 and time.monotonic() - started < 120  # not train.timeout_s x forever
    assert ("error: a collective timed out after 10s (train.timeout_s) on rank 0: rank(s) 1 did not answer"
            in stderr)
    assert "CollectiveTimeout" in stderr and "Root Cause" in stderr  # torchrun's summary, from @record
