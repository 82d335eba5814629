"""The DDP training entrypoint.

    torchrun --nproc_per_node=4 -m job.train [--config FILE] [section.key=value ...]
    python -m job.train [--config FILE] [section.key=value ...]      (one process, no torchrun)

run() reads top to bottom: check the launch, build what is trained, the epoch loop, finish. Checkpoints are
written by Checkpointer.save (after each epoch in train_epochs, and inside epochs in StepEnd), stop signals are
checked in StepEnd (every train.stop_check_every_steps steps) and at each epoch's end, metrics go out through
Tracker.log_epoch / log_final.
"""

import argparse
import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.elastic.multiprocessing.errors import record
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from job import checkpoint, cli, config, data, distributed, host, outdir
from job.checkpoint import CheckpointError, Checkpointer
from job.config import Config, ConfigError
from job.data import DataError, Splits
from job.distributed import LaunchError, Runtime
from job.evaluate import Scores, evaluate
from job.outdir import OutDirError
from job import averaging
from job.loop import Parts, TrainState, autocast_dtype, precision_warning, train_one_epoch
from job.optim import build_optimizer, build_scheduler
from job.preemption import PREEMPTED_EXIT_CODE, Preempted, StopSignal
from job.progress import Progress
from job.tracking import INCOMPLETE_EXIT_CODE, Tracker, TrackingError
from senet import senet

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


def check_launch(cfg: Config, runtime: Runtime) -> None:
    """What a launch must fit before anything is read or written (job.preflight runs it too)."""
    t = cfg.train
    if t.batch_size % runtime.world_size:
        raise ConfigError(f"train.batch_size {t.batch_size} is not divisible by the world size {runtime.world_size}")
    use_sync_bn(t.sync_bn, t.batch_size // runtime.world_size, runtime)  # refuses true on the CPU, now


def check_resume(cfg: Config) -> tuple[Path | None, dict | None, list[str]]:
    """(checkpoint path, its state, the settings this launch changes in it) per train.resume, or (None, None, [])
    to start fresh; raises the one line of a checkpoint this config cannot resume (job.preflight runs it too)."""
    found = checkpoint.resume_from(cfg.train.resume, cfg.train.out_dir, warn=cli.warning)
    if not found:
        return None, None, []
    path, saved = found
    checkpoint.check_compatible(saved, cfg, path)
    return path, saved, checkpoint.resume_changes(saved, cfg, path)


def resume_plan(cfg: Config) -> str:
    """check_resume's answer as words: "resumes PATH, changing KEY OLD -> NEW, ..." or "starts fresh"."""
    path, _, changes = check_resume(cfg)
    return (f"resumes {path}" + (f", changing {', '.join(changes)}" if changes else "")) if path else "starts fresh"


def check(cfg: Config) -> int:
    """--check: what would fail the same way on every restart, found before torchrun starts: the config,
    out_dir's checkpoint and staged CIFAR-10 files (exit 2: a Kubernetes podFailurePolicy fails the Job once
    instead of restarting it), and a GPU where train.device=cuda asks for one (exit 1). The sbatch script
    stops on either. Writes nothing."""
    try:
        plan = outdir.finished_line(cfg) or resume_plan(cfg)
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


def prepare_out_dir(cfg: Config, runtime: Runtime) -> None:
    """Rank 0 creates out_dir and writes the resolved config there; every rank learns whether that worked."""
    error = None
    if runtime.is_main:
        try:
            Path(cfg.train.out_dir).mkdir(parents=True, exist_ok=True)
            config.dump(cfg, Path(cfg.train.out_dir) / "config.yaml")
        except OSError as e:
            error = CheckpointError(f"cannot write to train.out_dir {cfg.train.out_dir}: {e.strerror}")
    if not distributed.all_agree(error is None, runtime.device):
        raise error or CheckpointError(f"rank 0 cannot write to train.out_dir {cfg.train.out_dir}")


def steps_per_epoch(cfg: Config, runtime: Runtime, train_images: int) -> int:
    """Optimizer steps in one epoch (DistributedSampler drops the remainder); refuses a batch larger than the set."""
    per_rank = cfg.train.batch_size // runtime.world_size
    steps = train_images // runtime.world_size // per_rank
    if steps == 0:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} is larger than the training set "
                          f"({train_images} images)")
    return steps


def use_sync_bn(setting: str | bool, per_rank_batch: int, runtime: Runtime) -> bool:
    """train.sync_bn: auto turns SyncBatchNorm on where it matters (several CUDA ranks, under 32 images each)."""
    if setting == "auto":
        return runtime.device.type == "cuda" and runtime.world_size > 1 and per_rank_batch < 32
    if setting and runtime.device.type != "cuda":
        raise ConfigError("train.sync_bn=true needs CUDA: PyTorch's SyncBatchNorm has no CPU implementation "
                          "(use auto or false)")
    return bool(setting)


WHITEN_IMAGES = 5000  # train.whiten_stem's sample: airbench's; the 3x3 patch covariance settles long before


def build(cfg: Config, runtime: Runtime, steps: int, saved: dict | None,
          train_images: torch.Tensor | None = None) -> Parts:
    """Model, EMA, optimizer, scheduler and scaler (loaded from saved when resuming), then DDP and compile.
    train_images (uint8, on the device) are what train.whiten_stem initialises the stem from."""
    t = cfg.train
    torch.manual_seed(t.seed)
    model = senet(**dataclasses.asdict(cfg.model)).to(runtime.device)
    if t.whiten_stem and not saved and train_images is not None:  # the same images on every rank: the same stem
        model.whiten_stem_(data.normalize(train_images[:WHITEN_IMAGES]))
    if use_sync_bn(t.sync_bn, t.batch_size // runtime.world_size, runtime):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same parameter and buffer names
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, t)
    parts = Parts(model, model, model, optimizer, build_scheduler(optimizer, t, steps),
                  torch.amp.GradScaler(runtime.device.type, enabled=t.precision == "fp16"),
                  ema=averaging.build(model, t.ema_decay, t.ema_mode, t.ema_every_steps))
    if saved:
        parts.load_state_dict(saved)
        torch.set_rng_state(saved["rng"]["torch"])
    if runtime.world_size > 1:
        # static_graph: every parameter is used in every step, the graph never changes; but not under compile,
        # whose DDPOptimizer (graph breaks at bucket boundaries) has known failures with static_graph.
        # broadcast_buffers=False: no broadcast of the BatchNorm statistics before every forward; training-mode
        # BatchNorm normalises with the batch's own, and evaluation broadcasts rank 0's (the checkpoint's) itself
        parts.train_model = DistributedDataParallel(
            model, device_ids=[runtime.device] if runtime.device.type == "cuda" else None,
            gradient_as_bucket_view=True, static_graph=not t.compile, bucket_cap_mb=t.bucket_mb,
            broadcast_buffers=False)
        if t.grad_compression == "bf16":
            parts.train_model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    parts.eval_model = averaging.predictor(model, parts.ema)
    if t.compile:
        # static shapes: evaluation's other batch size compiles a graph of its own, not a symbolic-batch one
        parts.train_model = torch.compile(parts.train_model, dynamic=False)
        parts.eval_model = torch.compile(parts.eval_model, dynamic=False)
    return parts


class StepEnd:
    """After every optimizer step: the hooks asked for (progress lines, the profiler), then ask all ranks about
    stop signals, and write step checkpoints."""

    def __init__(self, parts: Parts, checkpoints: Checkpointer, stop: StopSignal, every_steps: int,
                 hooks: list[Callable[[TrainState, int, int, torch.Tensor], None]]):
        self.parts, self.checkpoints, self.stop, self.every_steps = parts, checkpoints, stop, every_steps
        self.hooks = hooks

    def __call__(self, state: TrainState, step: int, steps: int, sums: torch.Tensor) -> None:
        for hook in self.hooks:
            hook(state, step, steps, sums)
        stopping = self.stop.requested(step)  # a collective: every rank gets the same answer at the same step
        if stopping or (self.every_steps and step % self.every_steps == 0 and step < steps):
            totals = sums.clone()
            dist.all_reduce(totals)
            state.step, state.partial = step, totals.tolist()
            self.checkpoints.save(self.parts, state)
        if stopping:
            self.checkpoints.wait()  # on disk before the process goes
            raise Preempted(f"{self.stop.received or 'a stop signal on another rank'} "
                            f"at epoch {state.epoch + 1} step {step}")


def score(parts: Parts, images: torch.Tensor, labels: torch.Tensor, cfg: Config, runtime: Runtime) -> Scores | None:
    """Validation or test scores of the evaluated weights (the EMA's when on), every image once across the ranks."""
    t = cfg.train
    return evaluate(parts.eval_model, images, labels, runtime, batch_size=t.eval_batch_size,
                    channels_last=t.channels_last, autocast_dtype=autocast_dtype(t.precision, runtime.device),
                    tta=t.tta)


def checkpoint_due(epoch: int, end: int, every: int, *, best: bool, stopping: bool) -> bool:
    """Whether last.pt is written after epoch (0-based): every `every` epochs, and always at a new best
    (best.pt must hold it), at this launch's last epoch and when stopping (a resume must find it)."""
    return best or stopping or epoch + 1 == end or (epoch + 1) % every == 0


def train_epochs(parts: Parts, splits: Splits, cfg: Config, runtime: Runtime, state: TrainState, tracker: Tracker,
                 checkpoints: Checkpointer, stop: StopSignal) -> bool:
    """The epoch loop; True when train.epochs are done, False when train.stop_after_epochs ended this launch."""
    t = cfg.train
    end = t.epochs if t.stop_after_epochs is None else min(t.epochs, state.epoch + t.stop_after_epochs)
    profiler = None
    if t.profile:
        from job.profile import StepProfiler

        profiler = StepProfiler.build(cfg, runtime, tracker.info)
    hooks = [h for h in (Progress.build(cfg, runtime, tracker), profiler) if h is not None]
    on_step = StepEnd(parts, checkpoints, stop, t.checkpoint_every_steps, hooks)
    with profiler or contextlib.nullcontext():
        started, first = time.perf_counter(), state.epoch
        for epoch in range(state.epoch, end):
            tic = time.perf_counter()
            stats = train_one_epoch(parts, splits, cfg, runtime, state, tracker, on_step)
            train_s = time.perf_counter() - tic
            val = score(parts, splits.val_x, splits.val_y, cfg, runtime)
            metrics = {"epoch": epoch, "train_loss": stats["train_loss"], "train_acc": stats["train_acc"],
                       "val_loss": val.loss if val else None, "val_acc": val.accuracy if val else None,
                       "lr": parts.scheduler.get_last_lr()[0], "images_per_sec": stats["images"] / train_s,
                       "epoch_time_s": time.perf_counter() - tic}
            best = state.end_epoch(metrics)
            stopping = stop.requested()
            if checkpoint_due(epoch, end, t.checkpoint_every_epochs, best=best, stopping=stopping):
                checkpoints.save(parts, state, best=best)  # before logging: the checkpoint is what a resume trusts
            per_epoch = (time.perf_counter() - started) / (epoch + 1 - first)
            # to MLflow once a checkpoint on disk holds it: a resume trains again what none holds
            tracker.log_epoch(metrics, t.epochs, eta_s=per_epoch * (t.epochs - epoch - 1), durable=checkpoints.durable)
            if stopping:
                checkpoints.wait()
                tracker.checkpointed(checkpoints.durable)
                raise Preempted(f"{stop.received or 'a stop signal on another rank'} at the end of epoch {epoch + 1}")
    checkpoints.wait()
    tracker.checkpointed(checkpoints.durable)
    if end < t.epochs:
        tracker.info(f"stopped after epoch {end} of {t.epochs} (train.stop_after_epochs); "
                     f"run again with train.resume=auto to continue")
        return False
    return True


def finish(parts: Parts, splits: Splits, cfg: Config, runtime: Runtime, state: TrainState, tracker: Tracker,
           checkpoints: Checkpointer) -> dict:
    """Score the best model on the test set once, log the final record, register the model; returns the record."""
    repaired = checkpoints.check_best(state.best_epoch)  # best.pt is the epoch the state names, or nothing is tested
    if repaired:
        tracker.warn(repaired)
    dist.barrier()  # best.pt is complete before any rank reads it
    best = checkpoint.load(checkpoints.best)
    averaging.predictor(parts.model, parts.ema).load_state_dict(checkpoint.weights(best))
    test = score(parts, splits.test_x, splits.test_y, cfg, runtime)
    final = {"test_acc": test.accuracy, "test_loss": test.loss, "best_epoch": state.best_epoch,
             "best_val_acc": state.best_val_acc, "test_images": test.count}
    tracker.log_final(final, state.history, test.confusion, checkpoints.best)
    tracker.register(checkpoint.weights(best), splits, val_acc=state.best_val_acc, test_acc=test.accuracy)
    return final


def run(cfg: Config, runtime: Runtime, config_path: str | None) -> bool:
    """Check the launch, build, train, then test the best model; the MLflow run ends with the outcome.
    Returns False when the job's results are complete on disk but not all of them reached MLflow."""
    check_launch(cfg, runtime)
    ownership, finished = outdir.claim(cfg, runtime)  # out_dir is this launch's until it ends
    try:
        if finished:
            cli.info(finished)
            return True
        return train_out_dir(cfg, runtime, config_path)
    finally:
        ownership.release()


def resume_note(path: Path | str, state: TrainState, epochs: int) -> str:
    """Where a resume goes on: an epoch and step, or, when every epoch is done (a launch stopped in the test or the
    registration), only the end of the run."""
    if state.epoch >= epochs:
        return f"resuming {path}: all {epochs} epochs done; testing and registering"
    return f"resuming {path} at epoch {state.epoch + 1} step {state.step}"


def train_out_dir(cfg: Config, runtime: Runtime, config_path: str | None) -> bool:
    """Resume or start the run in out_dir (owned by this launch), train it, test and register the best model.
    Returns whether everything meant for MLflow reached it (rank 0 knows; the others say True)."""
    t = cfg.train
    resume_path, saved, changes = check_resume(cfg)
    splits = data.load_splits(cfg.data, runtime)  # before out_dir: a launch that fails here changes nothing
    steps = steps_per_epoch(cfg, runtime, len(splits.train_y))
    prepare_out_dir(cfg, runtime)

    state = TrainState()
    tracker = Tracker(cfg, runtime)
    foreign = saved is not None and checkpoint.directory(t.out_dir).resolve() != resume_path.resolve().parent
    if saved:
        state.load_state_dict(saved["train_state"])
        if foreign:  # another run's checkpoint: its MLflow run stays as it is; this out_dir's run is a new one
            state.mlflow_run_id = None
            tracker.tags["resumed_from"] = str(resume_path.resolve())
    tracker.info(f"senet-job: world_size {runtime.world_size}  nodes {runtime.num_nodes} "
                 f"({distributed.layout(runtime)})  backend {runtime.backend}  device {runtime.device}  "
                 f"config {config_path or '(defaults)'}  out_dir {t.out_dir}"
                 + (f"  {resume_note(resume_path, state, t.epochs)}" if saved else ""))
    slow_precision = precision_warning(t.precision, runtime.device)
    if slow_precision:
        tracker.warn(slow_precision)
    resized = saved and checkpoint.world_size_change(saved, runtime.world_size, t.batch_size, steps)
    if resized:
        tracker.info(resized)
    if changes:
        tracker.info(f"resume: this launch changes {', '.join(changes)}; they apply from here on "
                     f"(config.yaml and the next checkpoint hold them)")
    parts = build(cfg, runtime, steps, saved, splits.train_x)
    checkpoints = Checkpointer(t.out_dir, runtime, cfg.to_dict())
    if foreign and not (resume_path.parent / "best.pt").is_file() and \
            checkpoint.epoch_ended(saved["train_state"]) != state.best_epoch:  # the state in hand, not a re-read
        # a checkpoint copied without its best.pt: the best epoch's weights stayed behind, so the best so far starts
        # again here rather than naming weights that are not on this disk
        tracker.warn(f"{resume_path} came without the best.pt beside it (epoch {(state.best_epoch or 0) + 1}'s "
                     f"weights): the best so far is forgotten; the next epoch's validation sets best.pt")
        state.best_val_acc = state.best_epoch = None
    if foreign:
        checkpoints.adopt_best(resume_path)  # the best weights so far came with the checkpoint
    repaired = checkpoints.check_best(state.best_epoch, resume_path)  # before training can make a new best
    if repaired:
        tracker.warn(repaired)
    stop = StopSignal(t.stop_signals, runtime.backend, t.stop_check_every_steps)
    tracker.stop = stop

    state.mlflow_run_id = tracker.open(state.history, state.mlflow_run_id)
    status, final = "FAILED", None
    try:
        if train_epochs(parts, splits, cfg, runtime, state, tracker, checkpoints, stop):
            final = finish(parts, splits, cfg, runtime, state, tracker, checkpoints)
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
                                    trace_dir=Path(cfg.train.out_dir) / "nccl_trace")
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
