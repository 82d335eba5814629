"""A real, local Slurm cluster for tests: munged, one slurmctld, two slurmd emulating nodes n1 and n2.

Debian's slurm-wlm (slurmctld slurmd slurm-client munge) started directly, without systemd, with all
state under a temporary directory. Both nodes live on 127.0.0.1 with distinct ports; every node has
the same hostname, so scripts must use Slurm's NodeAddr, never `hostname`.
"""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sacct")


def available() -> str | None:
    """None if the binaries are installed, else the reason to skip."""
    missing = [b for b in BINARIES[:5] if not shutil.which(b) and not Path(f"/usr/sbin/{b}").exists()]
    return f"Slurm/munge not installed ({', '.join(missing)}); .ci/run installs them" if missing else None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class SlurmCluster:
    def __init__(self, root: Path, nodes: tuple[str, ...] = ("n1", "n2"), cpus: int = 2, gpus: int = 2):
        self.root, self.nodes, self.cpus, self.gpus = root, nodes, cpus, gpus
        self.procs: list[subprocess.Popen] = []
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _spawn(self, *cmd: str, log: str) -> None:
        out = open(self.root / log, "ab")
        self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def start(self, timeout: float = 60) -> "SlurmCluster":
        r = self.root
        for d in ("munge", "state", "log", *(f"spool/{n}" for n in self.nodes)):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o755)  # the socket directory must be world-executable
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        socket_path = r / "munge" / "munge.socket.2"
        subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={socket_path}",
                        f"--pid-file={r / 'munge' / 'munged.pid'}", f"--log-file={r / 'log' / 'munged.log'}",
                        f"--seed-file={r / 'munge' / 'munged.seed'}"], check=True, env=self.env)
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        # Both fake nodes share 127.0.0.1, so torchrun's c10d heuristic (a loopback endpoint is "mine") makes
        # every node's agent try to host the rendezvous store; on a real cluster only the head node owns the
        # head's address. A task prolog says which one is the head, as the real addresses would.
        prolog = r / "task_prolog.sh"
        prolog.write_text('#!/bin/sh\n[ "$SLURM_NODEID" = 0 ] && echo "export PET_RDZV_CONF=is_host=1" '
                          '|| echo "export PET_RDZV_CONF=is_host=0"\n')
        prolog.chmod(0o755)
        host = socket.gethostname()
        lines = [
            "ClusterName=senetci", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={ctld_port}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", f"AuthInfo=socket={socket_path}",
            "CredType=cred/munge", f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool' / '%n'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "SchedulerType=sched/backfill", "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none", "ReturnToService=2", "SlurmctldTimeout=30", "SlurmdTimeout=30",
            "InactiveLimit=0", "KillWait=30", "MinJobAge=600", "SchedulerParameters=sched_interval=1",
            f"TaskProlog={prolog}", "GresTypes=gpu",
        ]
        # GPUs Slurm counts and hands out but that do not exist: a job asking for one gets SLURM_GPUS_ON_NODE
        # and no CUDA device, which is how the sbatch script's "asked for GPUs, got none" refusal is tested
        devices = [r / f"nvidia{i}" for i in range(self.gpus)]
        for d in devices:
            d.unlink(missing_ok=True)
            d.symlink_to("/dev/null")  # a character device, as Slurm expects of a GPU's File
        (r / "gres.conf").write_text("".join(f"Name=gpu File={d}\n" for d in devices))
        for name, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus} RealMemory=8000 Gres=gpu:{self.gpus} State=UNKNOWN")
        # A site that requeues preempted jobs: a job in "urgent" takes the nodes of a running "debug" job, which
        # gets SIGTERM and GraceTime seconds to stop, then Slurm requeues it
        lines += ["PreemptType=preempt/partition_prio", "PreemptMode=REQUEUE",
                  f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP "
                  "PriorityTier=1 GraceTime=60",
                  f"PartitionName=urgent Nodes={','.join(self.nodes)} MaxTime=INFINITE State=UP PriorityTier=2 "
                  "PreemptMode=OFF"]
        self.conf.write_text("\n".join(lines) + "\n")
        self._spawn("slurmctld", "-D", "-i", "-f", str(self.conf), log="log/slurmctld.out")
        for name in self.nodes:
            self._spawn("slurmd", "-D", "-N", name, "-f", str(self.conf), log=f"log/slurmd-{name}.out")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a Slurm daemon exited\n{self.logs()}")
            info = self.run("sinfo", "-N", "-h", "-o", "%N %t", check=False).stdout.split()
            states = dict(zip(info[::2], info[1::2]))
            if all(states.get(n) == "idle" for n in self.nodes):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"Slurm did not come up in {timeout}s: {states}\n{self.logs()}")

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True, check=check, **kw)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*")))

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def stop(self) -> None:
        self.run("scancel", "--user=root", check=False)
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        pid = self.root / "munge" / "munged.pid"
        if pid.exists():
            try:
                os.kill(int(pid.read_text()), 15)
            except (ProcessLookupError, ValueError):
                pass
