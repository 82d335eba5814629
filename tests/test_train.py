"""The job end to end, as a user runs it: torchrun with 2 CPU ranks, plain python, resume, bad launches."""

import pytest

from tests.conftest import TINY, load_ckpt, read_metrics, run_job

pytestmark = pytest.mark.slow  # torchrun launches (tests/conftest.py SLOW_FIXTURES)



def test_two_ranks_learn_far_above_chance(straight):
    out, result = straight
    records = read_metrics(out)
    epochs, final = records[:-1], records[-1]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert final["test_acc"] > 0.9 and final["test_images"] == 256  # chance is 0.1
    assert epochs[-1]["val_acc"] > 0.9 and epochs[-1]["train_acc"] > epochs[0]["train_acc"]
    for r in epochs:
        assert {"epoch", "train_loss", "train_acc", "val_acc", "lr", "images_per_sec", "epoch_time_s"} <= set(r)
        assert 0 <= r["train_acc"] <= 1 and 0 <= r["val_acc"] <= 1 and r["images_per_sec"] > 0


def test_rank_zero_alone_prints_one_start_line_and_one_line_per_epoch(straight):
    _, result = straight
    lines = result.stdout.splitlines()
    start = [line for line in lines if line.startswith("senet-job:")]
    assert len(start) == 1
    assert "world_size 2" in start[0] and "nodes 1" in start[0] and "backend gloo" in start[0]
    assert "device cpu" in start[0] and "config (defaults)" in start[0]
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert [line.split()[1] for line in epoch_lines] == ["1/3", "2/3", "3/3"]
    assert all(k in epoch_lines[0] for k in ("loss", "train_acc", "val_acc", "lr", "img/s", "ETA"))


def test_outputs_config_and_checkpoints(straight):
    out, _ = straight
    import yaml
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["epochs"] == 3
    last = load_ckpt(out / "checkpoints" / "last.pt")
    assert last["train_state"]["epoch"] == 3 and last["world_size"] == 2
    assert set(last) == {"model", "optimizer", "scheduler", "scaler", "train_state", "rng", "config", "world_size"}
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in last["model"])
    from senet import senet18
    senet18(width=8).load_state_dict(last["model"], strict=True)
    best = load_ckpt(out / "checkpoints" / "best.pt")["train_state"]
    assert best["epoch"] - 1 == best["best_epoch"] == read_metrics(out)[-1]["best_epoch"]
    assert best["best_val_acc"] == read_metrics(out)[-1]["best_val_acc"] > 0.9
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_plain_python_without_torchrun(tmp_path, tiny):
    result = run_job([*tiny, "train.epochs=1", f"train.out_dir={tmp_path / 'out'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world_size 1" in result.stdout
    assert read_metrics(tmp_path / "out")[-1]["test_images"] == 256


def test_resume_never_refuses_to_overwrite_and_a_finished_run_is_kept(straight, tiny, tmp_path):
    out, _ = straight
    before = (out / "checkpoints" / "last.pt").read_bytes()
    result = run_job([*tiny, "train.epochs=3", f"train.out_dir={out}", "train.resume=never"])
    assert result.returncode == 1
    assert result.stderr.strip().startswith(f"error: {out} already holds a checkpoint")
    assert (out / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.parametrize("extra,message", [
    (["train.resume={tmp}/nothing.pt"], "error: train.resume: checkpoint not found: {tmp}/nothing.pt"),
    (["train.resume={ckpt}", "model.width=16"],
     "error: checkpoint {ckpt} is for another model: width=8 (config says 16)"),
    (["train.out_dir={tmp}/file/out"], "error: cannot write to train.out_dir {tmp}/file/out: Not a directory"),
])
def test_bad_launches_fail_in_one_line(straight, tiny, tmp_path, extra, message):
    ckpt = straight[0] / "checkpoints" / "last.pt"
    (tmp_path / "file").write_text("not a directory")
    args = [a.format(tmp=tmp_path, ckpt=ckpt) for a in extra]
    result = run_job([*tiny, f"train.out_dir={tmp_path / 'new'}", *args])
    assert result.returncode == 1
    assert result.stderr.strip() == message.format(tmp=tmp_path, ckpt=ckpt)


def test_batch_not_divisible_by_world_size(tmp_path, tiny):
    result = run_job([*tiny, "train.batch_size=63", f"train.out_dir={tmp_path / 'out'}"], nproc=2)
    assert result.returncode != 0
    assert "error: train.batch_size 63 is not divisible by the world size 2" in result.stderr
    assert result.stderr.count("error: train.batch_size") == 1  # rank 0 alone speaks
    assert not (tmp_path / "out").exists()


def test_a_width_below_8_trains_contiguous_on_the_cpu_instead_of_corrupting_memory(tmp_path):
    """torch's CPU backward of a stride-2 1x1 convolution with < 8 input channels in channels_last corrupts the heap
    (the process aborts: free(): invalid next size); such a width trains contiguous, says so, and finishes."""
    import torch

    from job.loop import channels_last_note

    out = tmp_path / "out"
    result = run_job([*TINY, "model.width=4", "train.epochs=1", f"train.out_dir={out}"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("train.channels_last off: model.width=4 < 8 on the CPU trains contiguous") == 1
    saved = load_ckpt(out / "checkpoints" / "last.pt")
    assert saved["config"]["train"]["channels_last"] is True  # the config keeps what was asked
    assert saved["model"]["layer2.0.conv1.weight"].is_contiguous()  # the launch trained contiguous (3x3: strides tell)
    assert read_metrics(out)[-1]["test_images"] == 256
    assert channels_last_note(True, 8, torch.device("cpu")) is None  # 8 and wider: as asked
    assert channels_last_note(True, 4, torch.device("cuda")) is None
    assert channels_last_note(False, 4, torch.device("cpu")) is None
