"""slurm/train.sbatch on a live two-node Slurm (Debian's slurmctld + 2 slurmd + munge on 127.0.0.1)."""

import json
import time

import pytest
import torch
import yaml

from tests import slurm_cluster
from tests.conftest import ROOT, TINY, free_port, job_env, read_metrics, run_job, train_state, wait_until

pytestmark = pytest.mark.skipif(slurm_cluster.available() is not None, reason=str(slurm_cluster.available()))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


def submit(cluster, workdir, *overrides: str) -> str:
    # a free rendezvous port: job ids restart at 1 in every test cluster, and so would the default port
    env = {**job_env(), "SLURM_CONF": str(cluster.conf), "MASTER_PORT": str(free_port())}
    result = cluster.run("sbatch", "--nodes=2", f"--chdir={workdir}", str(ROOT / "slurm" / "train.sbatch"),
                         *overrides, env=env)
    return result.stdout.split()[-1]


def wait_state(cluster, job_id: str, states: set[str], timeout: float = 300) -> str:
    wait_until(lambda: cluster.job_state(job_id) in states, timeout, what=f"job {job_id} in {sorted(states)}",
               interval=0.5)
    return cluster.job_state(job_id)


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
    def first_epoch_done() -> bool:
        assert cluster.job_state(job) in ("PENDING", "RUNNING"), cluster.logs()
        return metrics.exists() and metrics.read_text().count("\n") >= 1
    wait_until(first_epoch_done, 300, what="the first epoch")
    # what --signal=B:USR1@120 does near the time limit: USR1 to the batch script only
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    wait_until(lambda: "REQUEUE" in cluster.job_state(job) or cluster.job_state(job) == "PENDING", 120,
               what="the requeue")
    stopped = train_state(out / "checkpoints" / "last.pt")
    assert (stopped["epoch"], stopped["step"]) != (6, 0)
    wait_state(cluster, job, {"PENDING"}, timeout=60)
    # Starting it again before the nodes have cleaned up the first run fails it ("Job credential
    # revoked"): Slurm's own ~120 s hold avoids that; the test waits for idle nodes instead.
    wait_until(lambda: set(cluster.run("sinfo", "-N", "-h", "-o", "%t").stdout.split()) == {"idle"}, 60,
               what="idle nodes", interval=0.5)
    # slurmd compares a credential's creation time with the requeue's revocation at 1 s resolution:
    # the new start must fall in a later second than the revocation
    requeued = time.time()
    wait_until(lambda: time.time() >= requeued + 2, 5, what="the next second")
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")  # else Slurm holds it ~120 s
    state = wait_state(cluster, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
    log = (tmp_path / f"senet-{job}.out").read_text()
    assert state == "COMPLETED", log[-4000:]
    assert "USR1 (time limit or preemption near)" in log and "preempted: SIGTERM" in log
    assert "restart 1" in log and f"at epoch {stopped['epoch'] + 1} step {stopped['step']}" in log
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r.get("epoch") for r in records] == [0, 1, 2, 3, 4, 5, None]


def test_an_array_trains_one_seed_per_task_and_the_report_groups_them(cluster, mlflow_server, tmp_path):
    base = tmp_path / "seeds"
    env = {**job_env(), "SLURM_CONF": str(cluster.conf), "SENET_OUT_DIR": str(base)}
    tracked = [a for a in TINY if not a.startswith("mlflow.")]
    args = [*tracked, "train.epochs=2", f"mlflow.tracking_uri={mlflow_server.uri}", "mlflow.experiment=array",
            "mlflow.registered_model=array"]
    job = cluster.run("sbatch", "--array=0-2", "--nodes=1", f"--chdir={tmp_path}",
                      str(ROOT / "slurm" / "train.sbatch"), *args, env=env).stdout.split()[-1]
    for task in range(3):
        state = wait_state(cluster, f"{job}_{task}", {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
        assert state == "COMPLETED", "".join(p.read_text()[-3000:] for p in tmp_path.glob("senet-*.out"))
    for seed in range(3):
        out = base / f"seed-{seed}"
        assert yaml.safe_load((out / "config.yaml").read_text())["train"]["seed"] == seed
        assert read_metrics(out)[-1]["test_acc"] > 0.5
    report = run_job(["--experiment", "array", "--tracking-uri", mlflow_server.uri, "--format", "json"],
                     module="job.report")
    assert report.returncode == 0, report.stderr
    (row,) = json.loads(report.stdout)  # one recipe: the seeds and out_dirs do not make another
    assert row["runs"] == 3 and row["seeds"] == [0, 1, 2] and row["test_acc_std"] is not None


def test_an_array_refuses_a_seed_or_out_dir_of_its_own(cluster, tmp_path):
    env = {**job_env(), "SLURM_CONF": str(cluster.conf)}
    job = cluster.run("sbatch", "--array=0", "--nodes=1", f"--chdir={tmp_path}", str(ROOT / "slurm" / "train.sbatch"),
                      *TINY, "train.seed=5", env=env).stdout.split()[-1]
    assert wait_state(cluster, f"{job}_0", {"COMPLETED", "FAILED", "CANCELLED"}, timeout=60) == "FAILED"
    (log,) = tmp_path.glob("senet-*.out")
    assert "senet.sbatch: error: in an array job each task gets train.seed=<task id>" in log.read_text()
