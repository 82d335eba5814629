"""The forked launcher (tests/forkjob.py) runs a job as `python -m` does: same output, exit code, cwd, environment."""

import os
import subprocess

from tests.conftest import ROOT, _forks, forked, job_command, job_env, run_job


def real(args: list[str], cwd=ROOT, env: dict | None = None, module: str = "job.train") -> subprocess.CompletedProcess:
    return subprocess.run(job_command(args, module=module), cwd=cwd, env=env or job_env(), capture_output=True,
                          text=True, timeout=120)


def test_a_forked_job_says_and_exits_what_a_real_process_does():
    for args in (["--print-config", "train.epochs=7"], ["--check", "train.epochs=x"], ["--no-such-flag"]):
        child, process = run_job(args), real(args)
        assert (child.returncode, child.stdout, child.stderr) == (process.returncode, process.stdout,
                                                                  process.stderr), args
    if forked(job_env()):  # not with SENET_TEST_FORK=0
        assert _forks and _forks[0].proc.poll() is None  # they did go through the fork server


def test_a_forked_job_has_its_own_working_directory_and_environment(tmp_path):
    code = "import os, sys; print(os.getcwd(), os.environ.get('SENET_PROBE'), sys.argv[1:]); sys.exit(5)"
    (tmp_path / "probe.py").write_text(code)
    env = {**job_env(), "SENET_PROBE": "here", "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    process = real(["a", "b"], cwd=tmp_path, env=env, module="probe")
    env["PYTHONPATH"] = str(ROOT)  # forked (conftest.forked): the module is found from the working directory
    child = run_job(["a", "b"], cwd=tmp_path, env=env, module="probe")
    assert child.returncode == process.returncode == 5
    assert child.stdout == process.stdout == f"{tmp_path} here ['a', 'b']\n"
    assert "SENET_PROBE" not in os.environ  # the test's own process is untouched
