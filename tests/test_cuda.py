"""The CUDA path: nccl, bf16 autocast and channels_last, deterministic resume, CUDA-event step timing, the stop
flag, 2-GPU DDP with compile. Skipped with a reason where CUDA (or a second GPU) is absent; bench/gpu_check.py
runs this file first on a GPU machine."""

import signal

import pytest
import torch

from job import records
from tests.conftest import TINY, assert_same_as, kill_tree, read_metrics, run_job, start_job, train_state, wait_until

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (none on this machine)")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")

CUDA = [a for a in TINY if a != "train.device=cpu"] + ["train.device=cuda", "train.precision=bf16",
                                                       "train.channels_last=true"]


def test_one_rank_trains_on_nccl_with_bf16_and_channels_last(tmp_path):
    out = tmp_path / "out"
    result = run_job([*CUDA, "train.epochs=2", f"train.out_dir={out}"], nproc=1, torchrun=())  # CUDA: a real launch
    assert result.returncode == 0, result.stderr[-3000:]
    assert "backend nccl  device cuda:0" in result.stdout
    assert read_metrics(out)[-1]["test_acc"] > 0.5


def test_a_deterministic_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    """train.deterministic=true: deterministic kernels, no cuDNN autotuning, a fixed cuBLAS workspace."""
    args = [*CUDA, "train.epochs=3", "train.deterministic=true"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_job([*args, f"train.out_dir={straight}"]).returncode == 0
    assert run_job([*args, f"train.out_dir={split}", "train.stop_after_epochs=1"]).returncode == 0
    resumed = run_job([*args, f"train.out_dir={split}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_as(straight, split)


def test_step_times_come_from_cuda_events(tmp_path):
    out = tmp_path / "out"
    result = run_job([*CUDA, "train.epochs=1", "train.step_times=true", f"train.out_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    steps = records.read_steps(out)
    assert len(steps) == 512 // 32 and all(s["step_s"] > 0 for s in steps)


def test_the_stop_flag_stops_a_cuda_run_with_a_checkpoint(tmp_path):
    out = tmp_path / "out"
    proc = start_job([*CUDA, "train.epochs=50", f"train.out_dir={out}"])
    try:
        wait_until(lambda: train_state(out / "checkpoints" / "last.pt").get("epoch", 0) >= 1, proc=proc,
                   what="epoch 1's checkpoint")
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 143 and "preempted: SIGTERM" in stdout
    assert train_state(out / "checkpoints" / "last.pt")["epoch"] >= 1


@two_gpus
def test_two_gpus_train_with_ddp_and_compile(tmp_path):
    out = tmp_path / "out"
    result = run_job([*CUDA, "train.epochs=2", "train.compile=true", f"train.out_dir={out}"], nproc=2, timeout=900,
                     torchrun=())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world_size 2" in result.stdout and "backend nccl" in result.stdout
    assert read_metrics(out)[-1]["test_acc"] > 0.5
