"""The DDP training entrypoint.

    torchrun --nproc_per_node=4 -m job.train [--config FILE] [section.key=value ...]
    python -m job.train [--config FILE] [section.key=value ...]      (one process, no torchrun)

run() reads top to bottom: check the launch, resume.plan(), build what is trained, the epoch loop, finish.
Checkpoints are written by Checkpointer.save (after each epoch in train_epochs, and inside epochs by job/steps.py's
StepEnd, the loop's one per-step channel), stop signals are checked in StepEnd (every
train.stop_check_every_steps steps) and at each epoch's end, records go out through Tracker.log_epoch / log_final.
"""

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from job import averaging, checkpoint, cli, config, data, distributed, host, outdir, records, resume
from job.build import build, score
from job.checkpoint import CheckpointError, Checkpointer
from job.config import Config, ConfigError
from job.data import DataError, Splits
from job.distributed import LaunchError, Runtime
from job.launch import check_launch, steps_per_epoch
from job.loop import Parts, TrainState, channels_last_note, precision_warning, train_one_epoch
from job.outdir import OutDirError
from job.preemption import PREEMPTED_EXIT_CODE, Preempted, StopSignal
from job.progress import Progress
from job.steps import StepEnd
from job.tracking import INCOMPLETE_EXIT_CODE, Tracker, TrackingError

USER_ERRORS = (ConfigError, DataError, CheckpointError, LaunchError, TrackingError, OutDirError)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m job.train", description="Train SENet on CIFAR-10 with DDP.")
    parser.add_argument("--config", help="YAML file with model/data/train/mlflow sections")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--check", action="store_true",
                        help="check the config, whether out_dir's checkpoint can be resumed with it, the staged "
                             "CIFAR-10 files and, for train.device=cuda, a GPU; then exit: 0, 2 (config, "
                             "checkpoint or data) or 1 (no GPU), with the one-line error; nothing is written. "
                             "The first command of a pod or sbatch")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.epochs=10")
    return parser.parse_args(argv)


def check(cfg: Config) -> int:
    """--check: what would fail the same way on every restart, found before torchrun starts: the config,
    out_dir's checkpoint and staged CIFAR-10 files (exit 2: a Kubernetes podFailurePolicy fails the Job once
    instead of restarting it), and a GPU where train.device=cuda asks for one (exit 1). The sbatch script
    stops on either. Writes nothing."""
    try:
        plan = resume.finished_line(cfg) or resume.plan(cfg).words()
        if cfg.data.source == "cifar10" and not cfg.data.download:  # staged files: there, and whole
            data.check(cfg.data.root, cfg.data.verify)
    except (ConfigError, CheckpointError, OutDirError, DataError) as e:
        cli.error(str(e))
        return 2
    try:
        distributed.pick_device(cfg.train.device, local_rank=0, local_world_size=1)
    except LaunchError as e:  # this node's fault, not the config's: Kubernetes may retry the pod on another node
        cli.error(str(e))
        return 1
    print(f"senet-job: config OK; {plan}", flush=True)
    return 0


def train_epochs(parts: Parts, splits: Splits, state: TrainState, *, cfg: Config, runtime: Runtime, tracker: Tracker,
                 checkpoints: Checkpointer, stop: StopSignal) -> bool:
    """The epoch loop; True when train.epochs are done, False when train.stop_after_epochs ended this launch."""
    t = cfg.train
    end = t.epochs if t.stop_after_epochs is None else min(t.epochs, state.epoch + t.stop_after_epochs)
    profiler = None
    if t.profile:
        from job.profile import StepProfiler

        profiler = StepProfiler.build(cfg, runtime, tracker.info)
    hooks = [h for h in (Progress.build(cfg, runtime, tracker), profiler) if h is not None]
    on_step = StepEnd(parts, checkpoints, stop, t.checkpoint_every_steps, hooks, main=runtime.is_main,
                      step_times_dir=t.out_dir if t.step_times else None, device=runtime.device)
    with profiler or contextlib.nullcontext():
        started, first = time.perf_counter(), state.epoch
        for epoch in range(state.epoch, end):
            tic = time.perf_counter()
            stats = train_one_epoch(parts, splits, cfg, runtime, state, on_step)
            train_s = time.perf_counter() - tic
            val = score(parts, splits.val_x, splits.val_y, cfg, runtime)
            metrics = records.Epoch(epoch=epoch, train_loss=stats["train_loss"], train_acc=stats["train_acc"],
                                    val_loss=val.loss if val else None, val_acc=val.accuracy if val else None,
                                    lr=parts.scheduler.get_last_lr()[0], images_per_sec=stats["images"] / train_s,
                                    epoch_time_s=time.perf_counter() - tic)
            best = state.end_epoch(metrics)
            stopping = stop.requested()
            if checkpoint.due(epoch, end, t.checkpoint_every_epochs, best=best, stopping=stopping):
                checkpoints.save(parts, state, best=best)  # before logging: the checkpoint is what a resume trusts
            per_epoch = (time.perf_counter() - started) / (epoch + 1 - first)
            # to MLflow once a checkpoint on disk holds it: a resume trains again what none holds
            tracker.log_epoch(metrics, t.epochs, eta_s=per_epoch * (t.epochs - epoch - 1), durable=checkpoints.durable)
            if stopping:
                checkpoints.wait()  # here, not only in leave(): MLflow gets the epochs this checkpoint holds first
                tracker.checkpointed(checkpoints.durable)
                on_step.leave(f"at the end of epoch {epoch + 1}")
    checkpoints.wait()
    tracker.checkpointed(checkpoints.durable)
    if end < t.epochs:
        tracker.info(f"stopped after epoch {end} of {t.epochs} (train.stop_after_epochs); "
                     f"run again with train.resume=auto to continue")
        return False
    return True


def finish(parts: Parts, splits: Splits, state: TrainState, *, cfg: Config, runtime: Runtime, tracker: Tracker,
           checkpoints: Checkpointer) -> dict:
    """Score the best model on the test set once, log the final record, register the model; returns the record."""
    repaired = checkpoints.check_best(state.best_epoch)  # best.pt is the epoch the state names, or nothing is tested
    if repaired:
        tracker.warn(repaired)
    dist.barrier()  # best.pt is complete before any rank reads it
    best = checkpoint.load(checkpoints.best)
    averaging.predictor(parts.model, parts.ema).load_state_dict(checkpoint.weights(best))
    test = score(parts, splits.test_x, splits.test_y, cfg, runtime)
    final = records.Final(test_acc=test.accuracy, test_loss=test.loss, best_epoch=state.best_epoch,
                          best_val_acc=state.best_val_acc, test_images=test.count)
    tracker.log_final(final, state.history, test.confusion, checkpoints.best)
    tracker.register(checkpoint.weights(best), splits, val_acc=state.best_val_acc, test_acc=test.accuracy)
    return final


def run(cfg: Config, runtime: Runtime, config_path: str | None) -> bool:
    """Check the launch, build, train, then test the best model; the MLflow run ends with the outcome.
    Returns False when the job's results are complete on disk but not all of them reached MLflow."""
    check_launch(cfg, runtime)
    # out_dir is this launch's until it ends
    ownership, finished = outdir.claim(cfg.train.out_dir, runtime, lambda: resume.finished_line(cfg))
    try:
        if finished:
            cli.info(finished)
            return True
        return train_out_dir(cfg, runtime, config_path)
    finally:
        ownership.release()


def train_out_dir(cfg: Config, runtime: Runtime, config_path: str | None) -> bool:
    """Resume or start the run in out_dir (owned by this launch), train it, test and register the best model.
    Returns whether everything meant for MLflow reached it (rank 0 knows; the others say True)."""
    t = cfg.train
    start = resume.plan(cfg)
    splits = data.load_splits(cfg.data, runtime)  # before out_dir: a launch that fails here changes nothing
    steps = steps_per_epoch(cfg, runtime, len(splits.train_y))
    outdir.prepare(cfg, runtime)

    state, lost_best = start.train_state()
    tracker = Tracker(cfg, runtime)
    tracker.tags.update(start.tags())
    tracker.info(f"senet-job: world_size {runtime.world_size}  nodes {runtime.num_nodes} "
                 f"({distributed.layout(runtime)})  backend {runtime.backend}  device {runtime.device}  "
                 f"config {config_path or '(defaults)'}  out_dir {t.out_dir}"
                 + (f"  {start.note(state.epoch, state.step, t.epochs)}" if start.saved else ""))
    slow_precision = precision_warning(t.precision, runtime.device)
    if slow_precision:
        tracker.warn(slow_precision)
    narrow = channels_last_note(t.channels_last, cfg.model.width, runtime.device)
    if narrow:
        tracker.info(narrow)
    resized = start.world_size_note(runtime.world_size, t.batch_size, steps)
    if resized:
        tracker.info(resized)
    if start.changes:
        tracker.info(f"resume: this launch changes {', '.join(start.changes)}; they apply from here on "
                     f"(config.yaml and the next checkpoint hold them)")
    parts = build(cfg, runtime, steps, start.saved, splits.train_x)
    checkpoints = Checkpointer(t.out_dir, runtime, cfg.to_dict())
    if lost_best:
        tracker.warn(lost_best)
    if start.foreign:
        checkpoints.adopt_best(start.path)  # the best weights so far came with the checkpoint
    repaired = checkpoints.check_best(state.best_epoch, start.path)  # before training can make a new best
    if repaired:
        tracker.warn(repaired)
    stop = StopSignal(t.stop_signals, runtime.backend, t.stop_check_every_steps)
    tracker.stop = stop

    state.mlflow_run_id = tracker.open(state.history, state.mlflow_run_id)
    status, final = "FAILED", None
    try:
        if train_epochs(parts, splits, state, cfg=cfg, runtime=runtime, tracker=tracker, checkpoints=checkpoints,
                        stop=stop):
            final = finish(parts, splits, state, cfg=cfg, runtime=runtime, tracker=tracker, checkpoints=checkpoints)
            status = "FINISHED"
        else:
            status = "KILLED"  # stopped by train.stop_after_epochs: resumable
    except Preempted as e:
        tracker.info(f"preempted: {e}; checkpoint {checkpoints.last} written, exiting {PREEMPTED_EXIT_CODE} "
                     f"so that the launcher retries; the next launch resumes")
        status = "KILLED"
        raise
    finally:
        checkpoints.wait(raise_error=False)  # a crash's own error is the one to report (train_epochs raised others)
        stop.close()
        tracker.close(status)
    if not tracker.complete:
        cli.error(f"not everything reached MLflow ({', '.join(tracker.lost)}); {t.out_dir} holds all of it "
                  f"(metrics.jsonl, checkpoints); exiting {INCOMPLETE_EXIT_CODE}: the next launch ends the run again")
    elif final is not None and runtime.is_main:  # last: only a complete run is marked finished
        outdir.mark_finished(t.out_dir, {**final, "epochs": t.epochs, "mlflow_run_id": tracker.run_id,
                                         "config": cfg.to_dict()})
    return tracker.complete


@record
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = config.load(args.config, args.overrides)
    except ConfigError as e:
        cli.error(str(e))
        return 2
    if args.print_config:
        print(config.yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    if args.check:
        return check(cfg)
    try:
        host.exit_with_launcher()  # first: the agent may die while the rendezvous below waits
        runtime = distributed.setup(cfg.train.device, cfg.train.timeout_s,
                                    trace_dir=Path(cfg.train.out_dir) / outdir.NCCL_TRACE)
        host.tune(cfg.train, runtime)
        return 0 if run(cfg, runtime, args.config) else INCOMPLETE_EXIT_CODE
    except USER_ERRORS as e:
        cli.error(str(e))
        return 2 if isinstance(e, ConfigError) else 1
    except Preempted:
        return PREEMPTED_EXIT_CODE
    except RuntimeError as e:  # torch.distributed's errors derive from it; a timeout is told apart here
        diagnosis = distributed.diagnose_timeout(e, cfg.train.timeout_s)
        if diagnosis is e:
            raise
        print(f"error: {diagnosis}", file=sys.stderr, flush=True)  # every rank: each names what it saw
        raise diagnosis from e  # @record puts it, naming the ranks, in torchrun's error file
    finally:
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
