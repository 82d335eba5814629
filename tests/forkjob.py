"""`python -m job.X args` without paying for the imports each time: a process that has imported torch, torchvision,
MLflow and the rest once forks a child per job, and the child runs the module as `python -m` would.

    python -m tests.forkjob SOCKET      (the server; tests/conftest.py starts one per test worker and talks to it)

A job's own modules (job.*, senet.*) are imported by the child, fresh, so that what they read from the environment
at import is the job's environment. The child is a process of its own: its own session (a signal to its group
reaches it alone), its working directory, environment, stdout and stderr (the client's files, passed over the
socket), its exit code or signal reported back as subprocess reports them. What cannot go this way runs as a real
subprocess (conftest.run_job decides): several ranks under torchrun, and an environment that changes how Python
starts (a sitecustomize on PYTHONPATH).
"""

import json
import os
import signal
import socket
import sys

HEAVY = ("torch", "torch.distributed", "torch.distributed.run", "torchvision", "torchvision.transforms.v2", "numpy",
         "yaml", "psutil", "PIL.Image", "mlflow", "mlflow.pytorch", "matplotlib.pyplot",
         # what a tracked job imports on top (~2.4 s of CPU a job here): MLflow's sqlite stores and model flavour
         "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store", "mlflow.pyfunc",
         "mlflow.models", "mlflow.system_metrics.system_metrics_monitor", "alembic.command", "IPython", "networkx",
         "sympy")


def _become(request: dict, fds: list[int]) -> None:
    """In a forked child: a session of its own, the client's stdout and stderr, the job's directory and environment."""
    os.setsid()
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in fds:
        os.close(fd)
    sys.stdout = open(1, "w", buffering=1 if request["env"].get("PYTHONUNBUFFERED") else -1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])


def _run_module(request: dict, env: dict | None = None) -> None:
    """Run the job's module as `python -m` does, with env added to the environment; exits the process, never returns."""
    code = 1
    try:
        os.environ.update(env or {})
        sys.path[0] = os.getcwd()  # as `python -m` puts the working directory first
        sys.argv = [request["module"], *request["args"]]
        import runpy

        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:  # as the interpreter: an int is the code, None 0, anything else printed and 1
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:  # as the interpreter: a traceback, then death by SIGINT
            import traceback

            traceback.print_exc()
            code = -signal.SIGINT
        except BaseException:  # noqa: BLE001 -- what an uncaught exception does to `python -m`: a traceback, exit 1
            import traceback

            traceback.print_exc()
            code = 1
        import atexit
        import threading

        threading._shutdown()  # as the interpreter's own exit: non-daemon threads (a checkpoint writer) end first
        atexit._run_exitfuncs()  # then the exit handlers (MLflow ends its runs there)
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            if code < 0:
                signal.signal(-code, signal.SIG_DFL)
                os.kill(os.getpid(), -code)
            os._exit(code)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group(request: dict, nproc: int) -> None:
    """A one-node group of nproc ranks with torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR...),
    each forked from here; exits 0 when every rank did, else 1 (as torchrun), after ending the others as torchrun
    does (SIGTERM, then SIGKILL). No agent: for runs whose point is their result, not torchrun's behaviour; what
    torchrun adds is not exercised here (TORCHELASTIC_RUN_ID: the worker's watch on its agent; @record's error
    file; restarts; the agent's own report of a failed rank). The preemption tests compare torchrun's interrupted
    runs with a forked one bit for bit."""
    port = free_port()
    ranks = {}
    for rank in range(nproc):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
               "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(nproc),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        pid = os.fork()
        if pid == 0:
            _run_module(request, env)
        ranks[pid] = rank
    failed = False
    while ranks:
        pid, status = os.wait()
        ranks.pop(pid, None)
        if os.waitstatus_to_exitcode(status) != 0 and not failed:
            failed = True
            for other in ranks:
                os.kill(other, signal.SIGTERM)
            import threading

            def kill_later(pids=list(ranks)) -> None:
                import time

                time.sleep(30)
                for other in pids:
                    try:
                        os.kill(other, signal.SIGKILL)
                    except ProcessLookupError:
                        pass

            threading.Thread(target=kill_later, daemon=True).start()
    os._exit(1 if failed else 0)


def _child(request: dict, fds: list[int]) -> None:
    """In the forked child: become the job's process (or its group of ranks) and run its module; never returns."""
    try:
        _become(request, fds)
        if request.get("nproc"):
            _group(request, request["nproc"])
        _run_module(request)
    finally:
        os._exit(1)


def serve(path: str) -> None:
    """Import the heavy modules once, then fork a child per request on the Unix socket at path (one at a time)."""
    for name in HEAVY:
        try:
            __import__(name)
        except ImportError:
            pass
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        with conn:
            message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 2)
            request = json.loads(message)
            pid = os.fork()
            if pid == 0:
                server.close()
                conn.close()
                _child(request, fds)
            for fd in fds:
                os.close(fd)
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            _, status = os.waitpid(pid, 0)
            try:
                conn.sendall(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
            except OSError:  # the client gave up on it (a timeout): nobody to tell
                pass


class Client:
    """The test side: starts the server on first use and runs one job at a time through it."""

    def __init__(self, directory: str, env: dict):
        self.path, self.env = os.path.join(directory, "forkjob.sock"), env  # env: the server's own
        self.proc = None

    def start(self) -> None:
        """Start the server and wait until it listens."""
        import subprocess

        if os.path.exists(self.path):  # a server before this one died
            os.unlink(self.path)
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.forkjob", self.path], env=self.env,
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"tests.forkjob did not start (exit {self.proc.wait()})")

    def run(self, module: str, args: list[str], cwd, env: dict, timeout: float, nproc: int = 0):
        """As subprocess.run([python, -m, module, *args], capture_output=True, text=True, timeout=timeout); nproc
        ranks with torchrun's environment where nproc > 0 (tests/forkjob.py _group)."""
        import subprocess
        import tempfile

        if self.proc is None or self.proc.poll() is not None:
            self.start()
        argv = [sys.executable, "-m", module, *args]
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(self.path)
            request = {"module": module, "args": list(args), "cwd": str(cwd), "env": env, "nproc": nproc}
            socket.send_fds(conn, [json.dumps(request).encode()], [out.fileno(), err.fileno()])
            reader = conn.makefile("r")
            pid = json.loads(reader.readline())["pid"]
            conn.settimeout(timeout)
            try:
                line = reader.readline()
            except (socket.timeout, TimeoutError):
                os.killpg(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(argv, timeout) from None
            code = json.loads(line)["returncode"]
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(argv, code, out.read().decode(errors="replace"),
                                               err.read().decode(errors="replace"))

    def stop(self) -> None:
        """End the server (jobs it forked are sessions of their own and end on their own)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


if __name__ == "__main__":
    serve(sys.argv[1])
