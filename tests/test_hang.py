"""A stuck rank ends the job within the collective timeout, with an error that names it."""

import time

import psutil
import pytest

from tests.conftest import TINY, kill_tree, start_job, wait_until

pytestmark = pytest.mark.slow  # torchrun launches (tests/conftest.py SLOW_FIXTURES)


def test_a_stopped_rank_is_named_instead_of_a_hang(tmp_path):
    out = tmp_path / "out"
    proc = start_job([*TINY, "train.epochs=20", "train.timeout_s=10", f"train.out_dir={out}"], nproc=2)
    try:
        metrics = out / "metrics.jsonl"
        wait_until(lambda: metrics.exists() and metrics.read_text(), timeout=120, proc=proc, what="the first epoch")
        workers = {c.environ().get("RANK"): c for c in psutil.Process(proc.pid).children(recursive=True)}
        workers["1"].suspend()  # SIGSTOP: alive, holding its sockets, answering nothing
        started = time.monotonic()
        wait_until(lambda: not workers["0"].is_running() or workers["0"].status() == psutil.STATUS_ZOMBIE,
                   timeout=90, what="rank 0 to give up on the stuck rank")
        gave_up_s = time.monotonic() - started
        # torchrun now SIGTERMs the stopped rank and waits 30 s before SIGKILL (torch 2.14 ignores
        # TORCH_ELASTIC_SHUTDOWN_TIMEOUT on this path); an operator's kill ends that wait
        workers["1"].kill()
        _, stderr = proc.communicate(timeout=60)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode != 0 and gave_up_s < 40  # train.timeout_s + a probe of as long, not forever
    assert ("error: a collective timed out after 10s (train.timeout_s) on rank 0: rank(s) 1 did not answer a 10s probe"
            in stderr)
    assert "CollectiveTimeout" in stderr and "Root Cause" in stderr  # torchrun's summary, from @record
