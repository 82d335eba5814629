"""slurm/train.sbatch on a live two-node Slurm (Debian's slurmctld + 2 slurmd + munge on 127.0.0.1)."""

import json
import os
import subprocess
import time

import pytest
import torch
import yaml

from tests import slurm_cluster
from tests.conftest import ROOT, TINY, TRACKED, free_port, job_env, read_metrics, run_job, train_state, wait_until

pytestmark = pytest.mark.slow  # a local Slurm cluster (tests/conftest.py SLOW_FIXTURES)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if slurm_cluster.available():
        pytest.skip(slurm_cluster.available())
    c = slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


# the test nodes' 2 CPUs and 8 GB; the script's own --gpus-per-node=1 stays (a GPU Slurm counts, CUDA cannot see)
FITS = ("--cpus-per-task=2", "--mem=1G")
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}


def submit(cluster, workdir, *overrides: str, sbatch: tuple[str, ...] = ("--nodes=2",)) -> str:
    # a free rendezvous port: job ids restart at 1 in every test cluster, and so would the default port
    env = {**job_env(), "SLURM_CONF": str(cluster.conf), "MASTER_PORT": str(free_port())}
    result = cluster.run("sbatch", *FITS, *sbatch, f"--chdir={workdir}", str(ROOT / "slurm" / "train.sbatch"),
                         *overrides, env=env)
    return result.stdout.split()[-1]


def wait_first_epoch(cluster, job: str, out) -> None:
    metrics = out / "metrics.jsonl"
    def done() -> bool:
        assert cluster.job_state(job) in ("PENDING", "RUNNING"), cluster.logs()
        return metrics.exists() and metrics.read_text().count("\n") >= 1
    wait_until(done, 300, what="the first epoch")


def start_requeued(cluster, job: str) -> None:
    """Run a requeued job now, once the nodes are clean (Slurm itself holds it ~120 s)."""
    wait_state(cluster, job, {"PENDING"}, timeout=60)
    # Starting it again before the nodes have cleaned up the first run fails it ("Job credential
    # revoked"): the test waits for idle nodes
    wait_until(lambda: set(cluster.run("sinfo", "-N", "-h", "-o", "%t").stdout.split()) == {"idle"}, 60,
               what="idle nodes", interval=0.5)
    # slurmd compares a credential's creation time with the requeue's revocation at 1 s resolution:
    # the new start must fall in a later second than the revocation
    requeued = time.time()
    wait_until(lambda: time.time() >= requeued + 2, 5, what="the next second")
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")


def wait_state(cluster, job_id: str, states: set[str], timeout: float = 300) -> str:
    wait_until(lambda: cluster.job_state(job_id) in states, timeout, what=f"job {job_id} in {sorted(states)}",
               interval=0.5)
    return cluster.job_state(job_id)


def test_usr1_requeues_and_a_later_term_stops_without_a_requeue(cluster, tmp_path):
    out = tmp_path / "out"
    job = submit(cluster, tmp_path, *TINY, "train.epochs=16", "data.train_subset=1024", f"train.out_dir={out}")
    wait_first_epoch(cluster, job, out)
    # what --signal=B:USR1@120 does near the time limit: USR1 to the batch script only
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    wait_until(lambda: "REQUEUE" in cluster.job_state(job) or cluster.job_state(job) == "PENDING", 120,
               what="the requeue")
    stopped = train_state(out / "checkpoints" / "last.pt")
    assert (stopped["epoch"], stopped["step"]) != (16, 0)
    start_requeued(cluster, job)
    log = tmp_path / f"senet-{job}.out"
    resumed = f"resuming {out}/checkpoints/last.pt at epoch {stopped['epoch'] + 1} step {stopped['step']}"
    # training again (the stop signals are handled from the first step on): the interrupted epoch's end
    wait_until(lambda: resumed in log.read_text() and f"epoch {stopped['epoch'] + 1}/16  loss" in log.read_text(),
               120, what="the resumed training")
    # then a TERM (scancel --signal=TERM --batch: a tired admin, a PreemptMode=CANCEL site): stop, no requeue
    cluster.run("scancel", "--signal=TERM", "--batch", job)
    state = wait_state(cluster, job, FINAL, timeout=120)
    text = log.read_text()
    assert state == "FAILED", text[-3000:]  # it did not finish: no afterok dependency may start
    assert "USR1 (time limit or preemption near)" in text and f"requeueing job {job}" in text
    assert "TERM (scancel, time limit or preemption)" in text and text.count("preempted: SIGTERM") == 2
    assert text.count("requeueing job") == 1 and "Restarts=1" in cluster.run("scontrol", "show", "job", job).stdout
    assert train_state(out / "checkpoints" / "last.pt")["epoch"] < 16 and not (out / "finished.json").exists()


def test_a_two_node_job_preempted_is_requeued_resumes_and_completes(cluster, tmp_path):
    out = tmp_path / "out"
    job = submit(cluster, tmp_path, *TINY, "train.epochs=8", "data.train_subset=1024", f"train.out_dir={out}")
    wait_first_epoch(cluster, job, out)
    # a job in the higher-tier partition takes both nodes: Slurm sends TERM to the training's tasks (not to
    # the batch script) and, with PreemptMode=REQUEUE, would requeue the job only when its GraceTime is over
    urgent = cluster.run("sbatch", "--parsable", "--partition=urgent", "--nodes=2", "--gpus-per-node=0", *FITS,
                         f"--chdir={tmp_path}", "--wrap", "true").stdout.strip()
    assert wait_state(cluster, urgent, FINAL, timeout=120) == "COMPLETED"
    stopped = train_state(out / "checkpoints" / "last.pt")
    start_requeued(cluster, job)
    state = wait_state(cluster, job, FINAL)
    log = (tmp_path / f"senet-{job}.out").read_text()
    assert state == "COMPLETED", log[-4000:]
    assert "(PreemptMode=REQUEUE): requeueing" in log and "preempted: SIGTERM" in log
    assert "restart 1" in log
    assert f"resuming {out}/checkpoints/last.pt at epoch {stopped['epoch'] + 1} step {stopped['step']}" in log
    assert [r.get("epoch") for r in read_metrics(out)] == [*range(8), None]
    assert read_metrics(out)[-1]["test_acc"] > 0.5
    # the two-node layout: the script's GPU request, srun's CPUs, the rendezvous at Slurm's NodeAddr
    assert "gpus_per_node 1 nproc_per_node 1 cpus_per_node 2 rendezvous 127.0.0.1:" in log  # not `hostname`
    assert log.count("senet-job: config OK; starts fresh") == 2  # job.train --check on each node first
    assert log.count(f"senet-job: config OK; resumes {out}/checkpoints/last.pt") == 2
    assert log.count("world_size 2  nodes 2 (node 0: rank 0; node 1: rank 1)") == 2
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["world_size"] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the test Slurm's GPU 0 would be this machine's real one")
def test_a_job_holding_gpus_that_cuda_cannot_see_stops_before_training(cluster, tmp_path):
    out = tmp_path / "out"
    job = submit(cluster, tmp_path, *[a for a in TINY if a != "train.device=cpu"], f"train.out_dir={out}")
    assert wait_state(cluster, job, FINAL, timeout=120) == "FAILED"
    log = (tmp_path / f"senet-{job}.out").read_text()
    assert "gpus_per_node 1 nproc_per_node 1 cpus_per_node 2" in log
    assert "error: train.device=cuda but CUDA is not available on this node" in log
    assert "job.train --check failed (its error is above); nothing was trained" in log
    assert "world_size" not in log and not out.exists()  # torchrun never started


def test_an_array_trains_one_seed_per_task_and_the_report_groups_them(cluster, mlflow_server, tmp_path):
    base = tmp_path / "seeds"
    env = {**job_env(), "SLURM_CONF": str(cluster.conf), "SENET_OUT_DIR": str(base)}
    args = [*TRACKED, "train.epochs=2", f"mlflow.tracking_uri={mlflow_server.uri}", "mlflow.experiment=array",
            "mlflow.registered_model=array"]
    job = cluster.run("sbatch", "--array=0-2", "--nodes=1", "--cpus-per-task=1", "--mem=1G", f"--chdir={tmp_path}",
                      str(ROOT / "slurm" / "train.sbatch"), *args, env=env).stdout.split()[-1]
    for task in range(3):
        state = wait_state(cluster, f"{job}_{task}", FINAL)
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
    job = cluster.run("sbatch", "--array=0", "--nodes=1", *FITS, f"--chdir={tmp_path}",
                      str(ROOT / "slurm" / "train.sbatch"), *TINY, "train.seed=5", env=env).stdout.split()[-1]
    assert wait_state(cluster, f"{job}_0", {"COMPLETED", "FAILED", "CANCELLED"}, timeout=60) == "FAILED"
    (log,) = tmp_path.glob("senet-*.out")
    assert "senet.sbatch: error: in an array job each task gets train.seed=<task id>" in log.read_text()


# ---- the script's srun lines, with stub Slurm commands (no Slurm, no pyxis: what the script asks of them) ----

STUBS = {
    "srun": 'printf "%s\\n" "$*" >> "$SRUN_LOG"; '
            'echo "$TORCH_FR_BUFFER_SIZE $TORCH_NCCL_DUMP_ON_TIMEOUT $TORCH_ELASTIC_SHUTDOWN_TIMEOUT" '
            '> "$SRUN_LOG.env"; echo "${GLOO_SOCKET_IFNAME-unset} ${NCCL_SOCKET_IFNAME-unset}" > "$SRUN_LOG.ifname"',
    "scontrol": 'printf "%s\\n" "$*" >> "$SCONTROL_LOG"; case "$*" in "show hostnames"*) echo n1;; '
                '"show node"*) echo "NodeName=n1 NodeAddr=10.0.0.1";; '
                '"show job"*) echo "JobState=RUNNING PreemptTime=${STUB_PREEMPT_TIME:-None}";; '
                '"show partition"*) echo "PartitionName=gpu PreemptMode=${STUB_PREEMPT_MODE:-REQUEUE}";; esac',
    "scancel": 'printf "%s\\n" "$*" >> "$SCONTROL_LOG"',
}
# what a CI machine's own environment must not change in the script's behaviour
FOREIGN = ("SLURM_", "SENET_", "TORCH_", "MASTER_PORT", "NPROC_PER_NODE", "OMP_NUM_THREADS", "GLOO_", "NCCL_")


def run_script(tmp_path, *overrides: str, **env: str):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in STUBS.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    slurm = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "4",
             "SLURM_CPUS_PER_TASK": "32", "SLURM_JOB_PARTITION": "gpu", "SRUN_LOG": str(tmp_path / "srun.log"),
             "SCONTROL_LOG": str(tmp_path / "scontrol.log")}
    clean = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN)}
    result = subprocess.run(["bash", str(ROOT / "slurm" / "train.sbatch"), *overrides], cwd=tmp_path, text=True,
                            capture_output=True, env={**clean, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                                                      **slurm, **env})
    log = tmp_path / "srun.log"
    return result, log.read_text().splitlines() if log.exists() else []


def test_pyxis_runs_every_step_in_the_image_with_the_submit_directory_mounted(tmp_path):
    result, sruns = run_script(tmp_path, "train.epochs=3", SENET_CONTAINER_IMAGE="ghcr.io#example/senet-job:0.1.0",
                               SENET_CONTAINER_MOUNTS="/shared:/shared")
    assert result.returncode == 0, result.stderr
    pyxis = (f"--container-image=ghcr.io#example/senet-job:0.1.0 --container-workdir={tmp_path} "
             f"--container-mounts={tmp_path}:{tmp_path},/shared:/shared")
    check, train = sruns
    assert check == (f"--ntasks-per-node=1 --cpus-per-task=32 --kill-on-bad-exit=1 {pyxis} "
                     "python -m job.train --check train.device=cuda train.epochs=3")
    assert train.startswith(f"--ntasks-per-node=1 --cpus-per-task=32 --kill-on-bad-exit=1 {pyxis} torchrun "
                            "--nnodes=1 --nproc_per_node=4 ")
    assert train.endswith("-m job.train train.device=cuda train.epochs=3")
    assert "rendezvous 10.0.0.1:29507" in result.stdout
    # the Flight Recorder on (dumps under out_dir: job.train), torchrun's grace for a checkpoint
    assert (tmp_path / "srun.log.env").read_text().split() == ["2000", "1", "100"]


def test_without_a_container_srun_runs_torchrun_and_a_cpu_job_keeps_its_device(tmp_path):
    result, (check, train) = run_script(tmp_path, SLURM_GPUS_ON_NODE="0", SLURM_CPUS_PER_TASK="16")
    assert result.returncode == 0, result.stderr
    assert check == "--ntasks-per-node=1 --cpus-per-task=16 --kill-on-bad-exit=1 python -m job.train --check"
    assert "--nproc_per_node=1 " in train and "train.device" not in train


def test_the_network_interface_reaches_gloo_and_nccl_only_when_set(tmp_path):
    assert run_script(tmp_path)[0].returncode == 0
    assert (tmp_path / "srun.log.ifname").read_text().split() == ["unset", "unset"]  # gloo and NCCL choose
    assert run_script(tmp_path, SENET_SOCKET_IFNAME="ib0")[0].returncode == 0
    assert (tmp_path / "srun.log.ifname").read_text().split() == ["ib0", "ib0"]
    assert run_script(tmp_path, SENET_SOCKET_IFNAME="ib0", NCCL_SOCKET_IFNAME="=ib1")[0].returncode == 0
    assert (tmp_path / "srun.log.ifname").read_text().split() == ["ib0", "=ib1"]  # one already set wins


def test_two_kinds_of_container_at_once_are_refused_before_anything_runs(tmp_path):
    result, sruns = run_script(tmp_path, SENET_CONTAINER="apptainer exec --nv senet.sif",
                               SENET_CONTAINER_IMAGE="senet.sqsh")
    assert result.returncode == 2 and sruns == []
    assert result.stderr.strip() == ("senet.sbatch: error: set SENET_CONTAINER (a command prefix) or "
                                     "SENET_CONTAINER_IMAGE (pyxis), not both")


def test_a_preempted_array_task_requeues_itself_not_the_whole_array(tmp_path):
    # the first task of array 7 has SLURM_JOB_ID 7 too: `scontrol requeue 7` would requeue every task
    result, _ = run_script(tmp_path, SLURM_ARRAY_JOB_ID="7", SLURM_ARRAY_TASK_ID="0",
                           STUB_PREEMPT_TIME="2026-11-28T22:39:29")
    assert result.returncode == 0, result.stderr
    scontrol = (tmp_path / "scontrol.log").read_text().splitlines()
    assert "show job 7_0" in scontrol and "requeue 7_0" in scontrol and "requeue 7" not in scontrol
    assert "preempted at 2026-11-28T22:39:29 (PreemptMode=REQUEUE): requeueing" in result.stdout


def test_a_preemption_where_the_site_cancels_is_not_requeued(tmp_path):
    result, _ = run_script(tmp_path, STUB_PREEMPT_TIME="2026-11-28T22:39:29", STUB_PREEMPT_MODE="CANCEL")
    assert result.returncode == 0, result.stderr
    assert ("preempted at 2026-11-28T22:39:29 (PreemptMode=CANCEL): not requeued; the same sbatch command resumes "
            "from the checkpoint") in result.stdout
    assert not any(line.startswith("requeue") for line in (tmp_path / "scontrol.log").read_text().splitlines())
