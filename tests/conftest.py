"""Shared helpers: run the job as a user would (a subprocess) and read what it wrote."""

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.child import kill_tree  # noqa: F401  (the tests' one way to end a job and its workers)
from job import records
from tests.forkjob import free_port  # the one the tests and the fork server use

ROOT = Path(__file__).resolve().parents[1]

# Tiny, fast settings used by the end-to-end tests (width 8, a few hundred synthetic images).
TINY = ["model.width=8", "data.source=synthetic", "data.val_size=128", "data.train_subset=512",
        "data.test_subset=256", "train.batch_size=32", "train.lr=0.05", "train.ref_batch_size=32",
        "train.warmup_epochs=0.5", "train.eval_batch_size=256", "mlflow.enabled=false",
        "train.device=cpu",  # gloo on the CPU by intent, never by accident of the hardware (a GPU machine too)
        "train.log_every_s=0"]  # a slow CI machine must not add a progress line to the logs tests read


# The 2-rank, 3-epoch run that the end-to-end tests share and that every interrupted run must equal.
COMMON = [*TINY, "train.epochs=3"]
TRACKED = [a for a in TINY if not a.startswith("mlflow.")]  # TINY for a run that an MLflow test's URI tracks


@pytest.fixture(autouse=True)
def _environment_kept():
    """What a test's in-process job code sets in os.environ (job.mlflow_env.fail_fast's MLflow HTTP settings) ends
    with the test: a job started later, by any test, would take it for its user's own."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


def job_env(**extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def job_command(args: list[str], nproc: int = 0, module: str = "job.train", torchrun: tuple[str, ...] = ()) -> list[str]:
    """`python -m MODULE args` (nproc=0) or `torchrun --standalone --nproc_per_node=nproc [torchrun] -m MODULE args`."""
    if not nproc:
        return [sys.executable, "-m", module, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *torchrun,
            "-m", module, *args]


_forks: list = []  # this test worker's tests.forkjob server, started on first use


def forked(env: dict) -> bool:
    """Whether a one-process job in env may be forked from tests.forkjob: not where PYTHONPATH adds a
    sitecustomize (it must run at interpreter start) or where SENET_TEST_FORK=0 asks for real processes."""
    return env.get("PYTHONPATH") == str(ROOT) and os.environ.get("SENET_TEST_FORK", "1") != "0"


def run_job(args: list[str], nproc: int = 0, cwd: Path = ROOT, timeout: int = 300, env: dict | None = None,
            module: str = "job.train", torchrun: tuple[str, ...] | None = None) -> subprocess.CompletedProcess:
    """Run the job to its end (see job_command); output captured as text. It is forked from a server that has
    imported torch and MLflow already (tests/forkjob.py): one process (nproc=0), or nproc ranks with torchrun's
    environment but no agent, seconds sooner. torchrun=(ARGS...) (() included) launches a real torchrun: for
    the tests whose point is what torchrun does."""
    env = env or job_env()
    if torchrun is None and forked(env):
        if not _forks:
            import tempfile

            from tests.forkjob import Client

            _forks.append(Client(tempfile.mkdtemp(prefix="forkjob-"), job_env()))
        return _forks[0].run(module, args, cwd, env, timeout, nproc)
    return subprocess.run(job_command(args, nproc, module, torchrun or ()), cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session", autouse=True)
def _stop_forks():
    yield
    for client in _forks:
        client.stop()


def start_job(args: list[str], nproc: int = 0, env: dict | None = None, torchrun: tuple[str, ...] = (),
              output: int | None = subprocess.PIPE) -> subprocess.Popen:
    """Start the job in a session of its own (kill_tree() ends it and its workers); output piped as text."""
    return subprocess.Popen(job_command(args, nproc, torchrun=torchrun), cwd=ROOT, env=env or job_env(),
                            stdout=output, stderr=output, text=True, start_new_session=True)


def wait_until(predicate, timeout: float = 240, proc: subprocess.Popen | None = None, what: str = "",
               interval: float = 0.1) -> None:
    """Poll predicate until it holds; fail at the deadline, or at once if proc (the job watched) has exited."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            output = proc.communicate()[1] if proc.stderr else ""
            pytest.fail(f"the job exited {proc.returncode} before {what or 'the condition held'}: {output[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or 'the condition'}")
        time.sleep(interval)


def read_metrics(out_dir: Path) -> list[dict]:
    """Every record of out_dir's metrics.jsonl in the file's order: the epochs, then the final one."""
    return records.read_lines(records.metrics_path(out_dir))  # every record, in the file's order


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)


# The runs that several tests read: their users go to one worker, so each runs once; the users of a file's
# module-scoped fixtures (a Slurm cluster, a tracked run) go together; every other test goes wherever a worker is
# free, so that the two workers stay evenly loaded to the end.
SHARED_RUNS = ("straight", "two_ranks")
# Fixtures that start several ranks or servers: their users are `slow` (`pytest -m "not slow"` leaves them out, as
# does a file that marks itself slow: those that launch torchrun, Slurm or a model server in most tests).
SLOW_FIXTURES = (*SHARED_RUNS, "mlflow_server", "cluster")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(items) -> None:
    """pytest-xdist (--dist loadgroup) runs the users of a shared run (SHARED_RUNS) on one worker, and those of a
    file's module-scoped fixtures on one worker (such a fixture then runs once); other tests go one by one."""
    for item in items:
        shared = next((name for name in SHARED_RUNS if name in item.fixturenames), None)
        # pytest has no public reader of a fixture's scope; without its private one, every test groups with its file
        info = getattr(item, "_fixtureinfo", None)
        scopes = {d.scope for defs in info.name2fixturedefs.values() for d in defs} if info else {"module"}
        if shared or "module" in scopes:
            item.add_marker(pytest.mark.xdist_group(shared or item.module.__name__))
        if set(SLOW_FIXTURES) & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def straight(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """(out_dir, result) of one uninterrupted 2-rank run of COMMON, shared by every test that reads or
    compares against it (none may write into it)."""
    out = tmp_path_factory.mktemp("straight") / "out"
    result = run_job([*COMMON, f"train.out_dir={out}"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a sqlite store and served artifacts under a temp dir."""

    def __init__(self, root: Path, port: int | None = None):
        self.root, self.port = root, port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 90) -> "MlflowServer":
        import urllib.request

        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--serve-artifacts", "--artifacts-destination", str(self.root / "artifacts")]
        self.log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer within {timeout}s")

    def stop(self) -> None:
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def client(self):
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


class Relay:
    """A TCP relay on 127.0.0.1 in front of a server, which a test cuts (new connections refused, open ones ended)
    and restores: the job sees its server go and come back while the server, its store and its port stay up (a
    server stopped and started again costs ~25 s here)."""

    def __init__(self, target_port: int):
        self.target, self.port = ("127.0.0.1", target_port), free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.lock, self.open, self.listener = threading.Lock(), [], None
        self.restore()

    def restore(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the same port again
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def cut(self) -> None:
        with self.lock:  # a connection accepted from here on is closed by _accept, not relayed
            listener, self.listener = self.listener, None
            conns = list(self.open)
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        listener.close()
        for conn in conns:  # ended as by a server that died: its pumps wake, a request under way fails
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:  # the other side has gone already
                pass

    def close(self) -> None:
        if self.listener is not None:
            self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                relayed = listener is self.listener  # not cut meanwhile
                if relayed:
                    self.open += [client, upstream]
            if not relayed:
                client.close()
                upstream.close()
                return
            done = threading.Barrier(2, action=lambda c=client, u=upstream: self._forget(c, u))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b, done), daemon=True).start()

    def _forget(self, *conns: socket.socket) -> None:
        """Both directions have ended: the connection's sockets are closed (by the last of its two pumps)."""
        with self.lock:
            self.open = [c for c in self.open if c not in conns]
        for conn in conns:
            conn.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, done: threading.Barrier) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:  # either side closed or reset
            pass
        done.wait()


@pytest.fixture(scope="session")  # one per test worker (~12 CPU-s a start): the tests keep to names of their own
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


TIME_KEYS = {"images_per_sec", "epoch_time_s"}  # metrics.jsonl fields that differ between equal runs


def load_ckpt(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def train_state(path) -> dict:
    """The TrainState of a checkpoint (epoch, step, best_epoch, ...); {} while there is none."""
    try:
        return load_ckpt(path)["train_state"]
    except FileNotFoundError:  # not yet written, or between the two renames of a save
        return {}


def faulty_save_env(tmp_path: Path, on_second_save: str) -> dict:
    """job_env() whose torch.save runs on_second_save (Python lines, `f` is the open file) instead of
    writing the second last.pt: a sitecustomize on PYTHONPATH simulates a disk or node failing mid-save."""
    site = tmp_path / "site"
    site.mkdir()
    body = "".join(f"            {line}\n" for line in on_second_save.splitlines())
    (site / "sitecustomize.py").write_text(
        "import errno, os, time, torch\n"
        "_save, _calls = torch.save, []\n"
        "def save(obj, f, *a, **k):\n"
        "    if 'last.pt' in str(getattr(f, 'name', f)):\n"
        "        _calls.append(1)\n"
        "        if len(_calls) == 2:\n"
        + body +
        "    return _save(obj, f, *a, **k)\n"
        "torch.save = save\n")
    return job_env(PYTHONPATH=f"{site}{os.pathsep}{ROOT}")


def assert_same_as(straight: Path, out: Path) -> None:
    """out ended bit for bit where the uninterrupted run (the `straight` fixture's out_dir) did."""
    import torch

    a, b = load_ckpt(straight / "checkpoints" / "last.pt"), load_ckpt(out / "checkpoints" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # bit for bit
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    ma, mb = read_metrics(straight), read_metrics(out)
    assert [r.get("epoch") for r in mb] == [0, 1, 2, None]
    for ra, rb in zip(ma, mb):
        for key in ra.keys() - TIME_KEYS:
            assert ra[key] == pytest.approx(rb[key], rel=1e-12), key  # partial sums add in another order
