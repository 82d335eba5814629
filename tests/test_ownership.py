"""One owner per out_dir, workers that die with their agent, finished runs left alone, resumes that say what
they change (job/outdir.py, job/host.py, job/resume.py resume_changes)."""

import os
import signal

import psutil
import pytest
import yaml

from job import config, outdir, resume
from tests.conftest import TINY, kill_tree, load_ckpt, read_metrics, run_job, start_job, wait_until

pytestmark = pytest.mark.slow  # torchrun launches (tests/conftest.py SLOW_FIXTURES)

LONG = [*TINY, "train.epochs=40"]


def test_a_second_launch_on_a_busy_out_dir_refuses_and_the_first_finishes_untouched(tmp_path):
    out = tmp_path / "out"
    first = start_job([*TINY, "train.epochs=3", f"train.out_dir={out}"])
    try:
        wait_until(lambda: (out / "metrics.jsonl").exists(), proc=first, what="the first launch to train")
        os.killpg(first.pid, signal.SIGSTOP)  # held mid-run, lock and all: a fast machine must not finish it first
        try:
            assert first.poll() is None and (out / ".owner").read_text() and not (out / "finished.json").exists(), \
                "the first launch finished before the second could meet it"
            second = run_job([*TINY, "train.epochs=3", f"train.out_dir={out}"], timeout=120)
        finally:
            os.killpg(first.pid, signal.SIGCONT)
        assert second.returncode == 1 and second.stdout == ""
        line = second.stderr.strip()
        assert line.count("\n") == 0, second.stderr
        assert line.startswith(f"error: train.out_dir {out} is in use by pid {first.pid} on ") and "started 20" in line
        _, err = first.communicate(timeout=240)
    finally:
        kill_tree(first.pid)
    assert first.returncode == 0, err[-2000:]
    epochs = [r["epoch"] for r in read_metrics(out) if "epoch" in r and "val_acc" in r]
    assert epochs == [0, 1, 2]  # no interleaved lines from the refused launch
    assert (out / "finished.json").exists() and (out / ".owner").read_text() == ""


def test_a_dead_owners_file_is_taken_over_with_a_note(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".owner").write_text("pid 999999 on elsewhere (started 2026-01-01T00:00:00+00:00)")  # no lock held
    result = run_job([*TINY, "train.epochs=1", f"train.out_dir={out}"], timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (f"warning: took over train.out_dir {out} from pid 999999 on elsewhere "
            f"(started 2026-01-01T00:00:00+00:00), which has ended") in result.stderr


def test_workers_stop_with_a_killed_torchrun_agent_and_leave_a_checkpoint(tmp_path):
    out = tmp_path / "out"
    agent = start_job([*LONG, f"train.out_dir={out}", "train.checkpoint_every_steps=0"], nproc=2)
    workers = []
    try:
        wait_until(lambda: (out / "metrics.jsonl").exists() and len(psutil.Process(agent.pid).children()) == 2,
                   proc=agent, what="two workers training")
        workers = psutil.Process(agent.pid).children()
        os.kill(agent.pid, signal.SIGKILL)  # the agent alone, as the OOM killer would
        agent.wait()
        wait_until(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers),
                   timeout=90, what="the orphaned workers to exit")
        err = agent.stderr.read()
    finally:
        kill_tree(agent.pid)
        for w in workers:
            kill_tree(w.pid)
    assert "warning: the torchrun agent" in err and "this worker" in err
    out_text = agent.stdout.read()  # they took the stop path: one agreed step, a checkpoint (rank 0 may hear of it
    assert "preempted: " in out_text and "exiting 143" in out_text  # from rank 1 first: "a stop signal on another rank")
    assert (out / "checkpoints" / "last.pt").exists()
    again = run_job([*TINY, "train.epochs=2", f"train.out_dir={out}"], timeout=180)  # the lock died with them
    assert "is in use" not in again.stderr


def test_a_finished_out_dir_exits_0_and_touches_nothing(tmp_path):
    out = tmp_path / "out"
    args = [*TINY, "train.epochs=1", f"train.out_dir={out}"]
    assert run_job(args, timeout=120).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".owner"}
    again = run_job(args, timeout=120)
    assert again.returncode == 0 and again.stderr == ""
    assert again.stdout.startswith(f"already finished: {out} (test_acc ") and again.stdout.count("\n") == 1
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".owner"} == before
    # a relaunch with other settings would claim what it did not do: refused, through a process once, then the
    # same check (resume.finished_line) in this one for other kinds of change
    refusal = ("train.out_dir {out} holds a run finished with other settings ({what}); to train on from it use a new "
               "out_dir with train.resume={out}/checkpoints/last.pt")
    other = run_job([*args, "train.epochs=3"], timeout=120)
    assert other.returncode == 1
    assert other.stderr.strip() == "error: " + refusal.format(out=out, what="train.epochs 1 -> 3")
    for extra, what in [("train.lr=0.3", "train.lr 0.05 -> 0.3"), ("train.tta=none", "train.tta flip -> none"),
                        (f"train.resume={out}/checkpoints/last.pt", f"train.resume={out}/checkpoints/last.pt")]:
        with pytest.raises(outdir.OutDirError) as info:
            resume.finished_line(config.load(overrides=[*args, extra]))
        assert str(info.value) == refusal.format(out=out, what=what)
    assert resume.finished_line(config.load(overrides=args)).startswith(f"already finished: {out} (test_acc ")


def test_a_new_out_dir_that_began_from_another_runs_checkpoint_goes_on_from_its_own(tmp_path):
    """The same command again (a requeue) continues the new out_dir, not the checkpoint it began from; a run that
    never beats the source's best validation accuracy still has best.pt to test (the source's)."""
    source, out = tmp_path / "source", tmp_path / "out"
    assert run_job([*TINY, "train.epochs=4", f"train.out_dir={source}"], timeout=120).returncode == 0
    assert read_metrics(source)[-1]["best_val_acc"] == 1.0  # nothing can beat it (3 epochs' 0.992 was, on some CPUs)
    longer = tmp_path / "longer"  # one more epoch: no new best
    more = run_job([*TINY, "train.epochs=5", f"train.out_dir={longer}", f"train.resume={source}/checkpoints/last.pt"],
                   timeout=120)
    assert more.returncode == 0, more.stderr[-2000:]
    assert (longer / "checkpoints" / "best.pt").read_bytes() == (source / "checkpoints" / "best.pt").read_bytes()
    args = [*TINY, "train.epochs=6", f"train.out_dir={out}", f"train.resume={source}/checkpoints/last.pt"]
    first = run_job([*args, "train.stop_after_epochs=1"], timeout=180)
    assert first.returncode == 0 and f"resuming {source}/checkpoints/last.pt at epoch 5 step 0" in first.stdout
    again = run_job(args, timeout=180)
    assert again.returncode == 0 and f"resuming {out}/checkpoints/last.pt at epoch 6 step 0" in again.stdout


def test_a_checkpoint_copied_without_its_best_pt_forgets_the_best_instead_of_naming_missing_weights(tmp_path):
    """last.pt alone, copied from a run whose best epoch was an earlier one: best.pt here would have to be a
    checkpoint that is not the best epoch's, so the best so far starts again (one warning) and the run ends
    testing weights whose validation accuracy it measured."""
    source, copy, out = tmp_path / "source", tmp_path / "copy", tmp_path / "out"
    assert run_job([*TINY, "train.epochs=4", f"train.out_dir={source}"], timeout=120).returncode == 0
    copy.mkdir()
    (copy / "last.pt").write_bytes((source / "checkpoints" / "last.pt").read_bytes())  # epoch 4; best was 3
    done = run_job([*TINY, "train.epochs=5", f"train.out_dir={out}", f"train.resume={copy / 'last.pt'}"], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"warning: {copy / 'last.pt'} came without the best.pt beside it (epoch 3's weights): the best so far " \
           f"is forgotten; the next epoch's validation sets best.pt" in done.stderr
    final = read_metrics(out)[-1]
    assert final["best_epoch"] == 4  # the one epoch validated since
    assert load_ckpt(out / "checkpoints" / "best.pt")["train_state"]["epoch"] == 5


@pytest.mark.parametrize("extra,says", [
    (["train.lr=0.1", "train.batch_size=128"], "train.batch_size 32 -> 128; train.lr 0.05 -> 0.1"),
    (["train.momentum=0.5"], "train.momentum 0.9 -> 0.5"),
    (["train.weight_decay=0"], "train.weight_decay 0.0005 -> 0.0"),
    (["train.schedule=onecycle"], "train.schedule cosine -> onecycle"),
    (["train.epochs=1"], "train.epochs 1 (the checkpoint has done 2 epochs)"),
    (["data.val_size=64"], "data.val_size 128 -> 64"),
    (["train.precision=fp16"], "train.precision to or from fp16 (its loss scaler's state does not carry over)")])
def test_a_resume_refuses_what_the_checkpoint_cannot_honour(extra, says):
    from job import checkpoint, config

    saved = {"config": config.load(overrides=[*TINY, "train.epochs=3"]).to_dict(), "train_state": {"epoch": 2, "step": 0}}
    with pytest.raises(checkpoint.CheckpointError) as info:
        resume.resume_changes(saved, config.load(overrides=[*TINY, "train.epochs=3", *extra]), "P")
    assert str(info.value) == f"cannot resume P with {says}: set it back, or train from scratch in another train.out_dir"


def test_a_resume_applies_what_it_can_names_it_and_refuses_the_rest(tmp_path):
    out = tmp_path / "out"
    assert run_job([*TINY, "train.epochs=3", "train.stop_after_epochs=2", f"train.out_dir={out}"],
                   timeout=120).returncode == 0
    config_before = (out / "config.yaml").read_text()
    refused = run_job([*TINY, "train.epochs=3", f"train.out_dir={out}", "train.lr=0.1"], timeout=120)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.strip() == (f"error: cannot resume {out}/checkpoints/last.pt with train.lr 0.05 -> 0.1: "
                                      f"set it back, or train from scratch in another train.out_dir")
    assert (out / "config.yaml").read_text() == config_before  # it tells the truth: nothing changed
    # the same refusal from the check pods and sbatch run before torchrun: exit 2, a config mistake
    checked = run_job(["--check", *TINY, "train.epochs=3", f"train.out_dir={out}", "train.lr=0.1"], timeout=120)
    assert checked.returncode == 2 and checked.stderr == refused.stderr
    checked = run_job(["--check", *TINY, "train.epochs=4", f"train.out_dir={out}"], timeout=120)
    assert checked.returncode == 0 and checked.stdout == (f"senet-job: config OK; resumes {out}/checkpoints/last.pt, "
                                                          f"changing train.epochs 3 -> 4\n")
    assert (out / "config.yaml").read_text() == config_before
    applied = run_job([*TINY, "train.epochs=4", "train.label_smoothing=0", f"train.out_dir={out}"], timeout=120)
    assert applied.returncode == 0, applied.stderr[-2000:]
    assert ("resume: this launch changes train.epochs 3 -> 4, train.label_smoothing 0.1 -> 0.0; they apply from "
            "here on") in applied.stdout
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 4 and saved["train"]["label_smoothing"] == 0.0
    assert [r["epoch"] for r in read_metrics(out) if "val_acc" in r and "epoch" in r] == [0, 1, 2, 3]


@pytest.mark.parametrize("case", ["a file", "too long", "a symlink loop"])
def test_an_out_dir_the_os_rejects_is_one_line_before_any_work(tmp_path, case):
    if case == "a file":
        (tmp_path / "f").write_text("")
        out, reason = tmp_path / "f" / "out", "Not a directory"
    elif case == "too long":
        out, reason = tmp_path / ("x" * 300), "File name too long"
    else:
        (tmp_path / "loop").symlink_to(tmp_path / "loop")
        out, reason = tmp_path / "loop" / "out", "Too many levels of symbolic links"
    result = run_job([*TINY, f"train.out_dir={out}"], timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == f"error: cannot write to train.out_dir {out}: {reason}"


def test_evaluate_refuses_a_file_that_is_not_the_jobs_checkpoint(tmp_path):
    import torch

    from senet import senet18

    bare = tmp_path / "bare.pt"
    torch.save(senet18(width=8).state_dict(), bare)
    result = run_job(["--model", str(bare), *TINY], module="job.evaluate", timeout=120)
    assert result.returncode == 1 and result.stderr.strip().startswith(f"error: {bare} is not a senet-job checkpoint")
    assert result.stderr.strip().count("\n") == 0 and "senet18().load_state_dict" in result.stderr
    exported = run_job(["--model", str(tmp_path / "model.pt2"), *TINY], module="job.evaluate", timeout=120)
    assert exported.returncode == 1 and exported.stderr.strip().count("\n") == 0
    assert exported.stderr.startswith(f"error: {tmp_path / 'model.pt2'}: job.evaluate scores a checkpoint")
