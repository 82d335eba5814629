"""slurm/train.sbatch on a live two-node Slurm (Debian's slurmctld + 2 slurmd + munge on 127.0.0.1)."""

import json
import time

import pytest
import torch

from tests import slurm_cluster
from tests.conftest import ROOT, TINY, job_env, read_metrics

pytestmark = pytest.mark.skipif(slurm_cluster.available() is not None, reason=str(slurm_cluster.available()))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


def submit(cluster, workdir, *overrides: str) -> str:
    env = {**job_env(), "SLURM_CONF": str(cluster.conf)}
    result = cluster.run("sbatch", "--nodes=2", f"--chdir={workdir}", str(ROOT / "slurm" / "train.sbatch"),
                         *overrides, env=env)
    return result.stdout.split()[-1]


def wait_state(cluster, job_id: str, states: set[str], timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while (state := cluster.job_state(job_id)) not in states:
        assert time.monotonic() < deadline, f"job {job_id} still {state}\n{cluster.logs()}"
        time.sleep(0.5)
    return state


def test_two_node_job_completes(cluster, tmp_path):
    out = tmp_path / "out"
    job = submit(cluster, tmp_path, *TINY, "train.epochs=2", f"train.out_dir={out}")
    state = wait_state(cluster, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
    log = (tmp_path / f"senet-{job}.out").read_text()
    assert state == "COMPLETED", log[-4000:]
    assert "world_size 2  nodes 2 (node 0: rank 0; node 1: rank 1)" in log
    assert "nproc_per_node 1 rendezvous 127.0.0.1:" in log  # NodeAddr, not `hostname`
    assert [r.get("epoch") for r in read_metrics(out)] == [0, 1, None]
    assert read_metrics(out)[-1]["test_acc"] > 0.5
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["world_size"] == 2


def test_preempted_job_checkpoints_requeues_and_resumes(cluster, tmp_path):
    out = tmp_path / "out"
    job = submit(cluster, tmp_path, *TINY, "train.epochs=6", "data.train_subset=2048", f"train.out_dir={out}")
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert time.monotonic() < deadline and cluster.job_state(job) in ("PENDING", "RUNNING"), cluster.logs()
        time.sleep(0.2)
    # what --signal=B:USR1@120 does near the time limit: USR1 to the batch script only
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    deadline = time.monotonic() + 120
    while "REQUEUE" not in cluster.job_state(job) and cluster.job_state(job) != "PENDING":
        assert time.monotonic() < deadline, (tmp_path / f"senet-{job}.out").read_text()[-4000:]
        time.sleep(0.2)
    stopped = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert (stopped["epoch"], stopped["step"]) != (6, 0)
    wait_state(cluster, job, {"PENDING"}, timeout=60)
    # Starting it again before the nodes have cleaned up the first run fails it ("Job credential
    # revoked"): Slurm's own ~120 s hold avoids that; the test waits for idle nodes instead.
    deadline = time.monotonic() + 60
    while set(cluster.run("sinfo", "-N", "-h", "-o", "%t").stdout.split()) != {"idle"}:
        assert time.monotonic() < deadline, cluster.logs()
        time.sleep(0.5)
    time.sleep(2)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")  # else Slurm holds it ~120 s
    state = wait_state(cluster, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
    log = (tmp_path / f"senet-{job}.out").read_text()
    assert state == "COMPLETED", log[-4000:]
    assert "USR1 (time limit or preemption near)" in log and "preempted: SIGTERM" in log
    assert "restart 1" in log and f"at epoch {stopped['epoch'] + 1} step {stopped['step']}" in log
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r.get("epoch") for r in records] == [0, 1, 2, 3, 4, 5, None]
