"""Signals and kills mid-epoch: all ranks stop at one step, checkpoint, and the resume is bit for bit."""

import os
import shutil
import signal
import subprocess

import psutil
import pytest

from job.preemption import PREEMPTED_EXIT_CODE
from tests.conftest import (COMMON, assert_same_as, faulty_save_env, job_env, kill_tree, read_metrics, run_job,
                            start_job, train_state, wait_until)

pytestmark = pytest.mark.slow  # torchrun launches (tests/conftest.py SLOW_FIXTURES)


def launch(out, *extra, env: dict | None = None, torchrun: tuple[str, ...] = ()) -> subprocess.Popen:
    return start_job([*COMMON, f"train.out_dir={out}", *extra], nproc=2, env=env, torchrun=torchrun)


def last_step(out) -> tuple[int, int]:
    """(epochs done, steps done in the next) of out's last.pt; (0, 0) before the first checkpoint."""
    state = train_state(out / "checkpoints" / "last.pt")
    return state.get("epoch", 0), state.get("step", 0)


def worker(proc, rank: int) -> psutil.Process:
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "job.train" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no worker of rank {rank}")


def restarted_worker(proc, attempt: int) -> list[psutil.Process]:
    """[rank 1's worker] once torchrun has started it for restart `attempt`, else []."""
    try:
        w = worker(proc, 1)
        return [w] if w.environ().get("TORCHELASTIC_RESTART_COUNT") == str(attempt) else []
    except (AssertionError, psutil.Error):
        return []


@pytest.mark.parametrize("signum,target", [(signal.SIGUSR1, "rank 1"), (signal.SIGTERM, "torchrun"),
                                           (signal.SIGINT, "group")])
def test_a_signal_stops_every_rank_at_one_step_with_a_checkpoint(straight, tmp_path, signum, target):
    """SIGUSR1 to one worker (as Slurm sends it), SIGTERM to torchrun (as Kubernetes does), or SIGINT to the
    whole process group (Ctrl-C at a terminal); the resume from that step is checked bit for bit once."""
    out = tmp_path / "out"
    proc = launch(out)
    wait_until(lambda: last_step(out)[0] >= 1, proc=proc, what="epoch 1's checkpoint")  # inside epoch 2
    if target == "group":
        os.killpg(proc.pid, signum)
    else:
        (worker(proc, 1) if target == "rank 1" else psutil.Process(proc.pid)).send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0  # never mistaken for a finished job
    assert "preempted: " in stdout and f"exiting {PREEMPTED_EXIT_CODE}" in stdout
    epoch, step = last_step(out)
    assert (epoch, step) != (3, 0)  # stopped before the end
    if target == "rank 1":
        assert f"exitcode  : {PREEMPTED_EXIT_CODE}" in stderr  # torchrun's report of the worker

    if target == "group":  # the resume is the same whatever stopped the run: proven once
        resumed = run_job([*COMMON, f"train.out_dir={out}"], nproc=2)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"at epoch {epoch + 1} step {step}" in resumed.stdout
        assert_same_as(straight[0], out)


def test_kill_after_a_step_checkpoint_resumes_mid_epoch_exactly(straight, tmp_path):
    out = tmp_path / "out"
    proc = launch(out, "train.checkpoint_every_steps=3")
    wait_until(lambda: last_step(out)[1] > 0, proc=proc, what="a mid-epoch checkpoint")
    kill_tree(proc.pid)
    proc.wait()
    epoch, step = last_step(out)
    assert step % 3 == 0 and step > 0
    one = tmp_path / "one"
    shutil.copytree(out, one)
    resumed = run_job([*COMMON, f"train.out_dir={out}", "train.checkpoint_every_steps=3"], nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at epoch {epoch + 1} step {step}" in resumed.stdout and "world size" not in resumed.stdout
    assert_same_as(straight[0], out)

    # the same checkpoint on one process (a preempted job back on fewer GPUs): said in one line, then trained on
    alone = run_job([*COMMON, f"train.out_dir={one}"])
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert (f"resume: world size 2 -> 1: per-rank batch 16 -> 32 (global 32, 16 steps per epoch and the LR "
            f"schedule unchanged); epoch {epoch + 1} goes on at step {step} of 16 with the images the 2 rank(s) "
            f"had not reached") in alone.stdout
    assert [r.get("epoch") for r in read_metrics(one)] == [0, 1, 2, None]
    assert train_state(one / "checkpoints" / "last.pt")["epoch"] == 3


def test_a_one_process_run_stopped_mid_epoch_resumes_on_two_ranks(tmp_path):
    out = tmp_path / "out"
    proc = start_job([*COMMON, f"train.out_dir={out}", "train.checkpoint_every_steps=5"])
    wait_until(lambda: last_step(out)[1] > 0, proc=proc, what="a mid-epoch checkpoint")
    kill_tree(proc.pid)
    proc.wait()
    epoch, step = last_step(out)  # an epoch's end may have been written after the poll: then step 0
    where = f"goes on at step {step} of 16" if step else "starts at its beginning"
    resumed = run_job([*COMMON, f"train.out_dir={out}"], nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (f"resume: world size 1 -> 2: per-rank batch 32 -> 16 (global 32, 16 steps per epoch and the LR "
            f"schedule unchanged); epoch {epoch + 1} {where}") in resumed.stdout
    assert [r.get("epoch") for r in read_metrics(out)][-1] is None
    assert read_metrics(out)[-1]["test_acc"] > 0.5


def test_torchrun_restarts_after_repeated_sigkills_and_ends_bit_for_bit(straight, tmp_path):
    """SIGKILL rank 1 three times at different steps under --max-restarts=3: each restart resumes."""
    out = tmp_path / "out"
    env = job_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")  # as docs/restarts.md, sbatch and manifests set it
    proc = launch(out, "train.checkpoint_every_steps=4", env=env, torchrun=("--max-restarts=3",))
    try:
        for attempt in range(3):
            victims = []
            wait_until(lambda: victims.extend(restarted_worker(proc, attempt)) or victims, timeout=60, proc=proc,
                       what=f"rank 1 of restart {attempt}")
            # the earlier attempt's workers are gone, its last checkpoint write included: a newer checkpoint is
            # this attempt's, which has resumed (a kill before that once left a restart with nothing to resume)
            seen = last_step(out)
            wait_until(lambda: last_step(out) > seen, proc=proc, what=f"progress of restart {attempt}")
            victims[0].kill()
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 0, stderr[-4000:]
    assert stdout.count("resuming") == 3
    assert_same_as(straight[0], out)


def test_unreadable_newest_checkpoint_falls_back_to_the_previous_one(straight, tmp_path):
    out = tmp_path / "out"
    first = run_job([*COMMON, f"train.out_dir={out}", "train.stop_after_epochs=2"], nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped after epoch 2 of 3 (train.stop_after_epochs)" in first.stdout
    last = out / "checkpoints" / "last.pt"
    assert train_state(out / "checkpoints" / "last.prev.pt")["epoch"] == 1
    last.write_bytes(last.read_bytes()[:1000])  # a torn file, as a dying disk or node leaves it
    resumed = run_job([*COMMON, f"train.out_dir={out}"], nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"warning: cannot read checkpoint {last}" in resumed.stderr
    assert "using the previous checkpoint" in resumed.stderr and "at epoch 2 step 0" in resumed.stdout
    assert_same_as(straight[0], out)  # an epoch-boundary resume is bit for bit too


def test_killed_during_a_save_leaves_a_usable_checkpoint(straight, tmp_path):
    """torch.save of the second last.pt writes half the file and stalls; then everything is SIGKILLed."""
    marker = tmp_path / "saving"
    env = faulty_save_env(tmp_path, f"f.write(b'x' * 100000); f.flush()\nopen({str(marker)!r}, 'w').close()\n"
                                    "time.sleep(600)")
    out = tmp_path / "out"
    proc = launch(out, env=env)
    wait_until(marker.exists, proc=proc, what="the stalled save")
    kill_tree(proc.pid)
    assert (out / "checkpoints" / ".last.pt.tmp").stat().st_size == 100000  # the half-written file
    assert train_state(out / "checkpoints" / "last.pt")["epoch"] == 1  # the old one, whole
    resumed = run_job([*COMMON, f"train.out_dir={out}"], nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at epoch 2 step 0" in resumed.stdout
    assert_same_as(straight[0], out)


def _checking_rank(rank: int, every: int, store: str, results: dict) -> None:
    """Two epochs of 23 steps calling StopSignal.requested after each step (and at the end of each) as the job
    does; rank 1 signals itself at epoch 1 step 7. Records where each rank stopped and where it all-reduced."""
    import torch
    import torch.distributed as dist

    from job.preemption import StopSignal

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    where, reduced, real = [None], [], dist.all_reduce

    def counted(*args, **kwargs):
        reduced.append(where[0])
        return real(*args, **kwargs)

    dist.all_reduce = counted  # this process only
    try:
        stop, stopped = StopSignal(["SIGUSR1"], "gloo", every), None
        for epoch in range(2):
            for step in range(1, 24):
                if rank == 1 and (epoch, step) == (1, 7):
                    os.kill(os.getpid(), signal.SIGUSR1)
                where[0] = (epoch, step)
                if stop.requested(step):
                    stopped = where[0]
                    break
            if stopped:
                break
            where[0] = (epoch, "end")
            if stop.requested():
                stopped = where[0]
                break
        stop.close()
        results[rank] = (stopped, reduced)
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as tests/test_distributed_data.py's workers: gloo sometimes aborts in the interpreter's exit


def test_ranks_talk_about_stopping_every_k_steps_and_stop_at_one_step(tmp_path):
    """train.stop_check_every_steps=5 on 2 gloo ranks: an all-reduce at steps 5, 10, 15, 20 and each epoch's end
    only, and a signal to one rank at epoch 1 step 7 stops both at step 15 (sent at the check of step 10, read at
    the next)."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_checking_rank, args=(5, str(tmp_path / "store"), results), nprocs=2)
        results = dict(results)
    checks = [(0, 5), (0, 10), (0, 15), (0, 20), (0, "end"), (1, 5), (1, 10), (1, 15)]
    assert results[0] == results[1] == ((1, 15), checks)
