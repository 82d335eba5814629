"""The DDP training entrypoint.

    torchrun --nproc_per_node=4 -m job.train [--config FILE] [section.key=value ...]
    python -m job.train [--config FILE] [section.key=value ...]      (one process, no torchrun)
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel

from job import checkpoint, config, data, distributed, host
from job.checkpoint import CheckpointError
from job.config import Config, ConfigError
from job.data import DataError, Splits
from job.distributed import LaunchError, Runtime
from job.evaluate import evaluate
from job.optim import build_optimizer, build_scheduler
from job.preemption import PREEMPTED_EXIT_CODE, Preempted, StopSignal
from job.tracking import Tracker, TrackingError
from senet import senet

USER_ERRORS = (ConfigError, DataError, CheckpointError, LaunchError, TrackingError)
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """train.precision as an autocast dtype (None: fp32); auto is bf16 on CUDA, fp32 on the CPU."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return AUTOCAST[precision]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m job.train", description="Train SENet on CIFAR-10 with DDP.")
    parser.add_argument("--config", help="YAML file with model/data/train/mlflow sections")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.epochs=10")
    return parser.parse_args(argv)


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


def train_one_epoch(model, optimizer, scheduler, scaler, splits: Splits, cfg: Config, runtime: Runtime,
                    epoch: int, tracker: Tracker, start_step: int, sums: torch.Tensor, at_step_end) -> dict:
    """This rank's shard of one epoch, from start_step; returns loss and accuracy summed over all ranks.

    sums (loss, correct, count) carries what earlier launches counted of this epoch. at_step_end(step,
    sums) runs after every optimizer step (the stop-signal check and step checkpoints live there).
    """
    t = cfg.train
    per_rank = t.batch_size // runtime.world_size
    order = data.epoch_indices(len(splits.train_y), t.seed, epoch, runtime.rank, runtime.world_size)
    order = order.to(runtime.device)
    steps = len(order) // per_rank
    dtype = autocast_dtype(t.precision, runtime.device)
    images = 0
    clock = tracker.step_clock()
    model.train()
    for step in tracker.progress(range(start_step, steps), steps - start_step, f"epoch {epoch + 1}"):
        clock.mark()
        idx = order[step * per_rank:(step + 1) * per_rank]
        g = data.step_generator(t.seed, epoch, step, runtime.rank, runtime.device)
        x = data.normalize(data.augment(splits.train_x[idx], g, cfg.data.cutout), t.channels_last)
        y = splits.train_y[idx]
        with torch.autocast(runtime.device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=t.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        # in place on the device; no tensor made from a host number (on CUDA that would sync every step)
        sums[0] += loss.detach().double() * len(y)
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += len(y)
        images += len(y) * runtime.world_size
        at_step_end(step + 1, steps, sums)
    clock.mark()
    tracker.log_steps(epoch, start_step, clock)
    dist.all_reduce(sums)
    loss_sum, correct, count = sums.tolist()
    return {"train_loss": loss_sum / count, "train_acc": correct / count, "images": images}


def run(cfg: Config, runtime: Runtime, config_path: str | None) -> None:
    """Set up data, model and optimizer (from a checkpoint if resuming), train, then test the best model."""
    t = cfg.train
    if t.batch_size % runtime.world_size:
        raise ConfigError(f"train.batch_size {t.batch_size} is not divisible by the world size {runtime.world_size}")
    found = checkpoint.resume_from(t.resume, t.out_dir, warn=_warning)
    resume_from, state = found if found else (None, None)
    if state:
        checkpoint.check_model(state, cfg.to_dict()["model"], resume_from)
    splits = data.load_splits(cfg.data, runtime)  # before out_dir: a launch that fails here changes nothing
    steps_per_epoch = len(splits.train_y) // runtime.world_size // (t.batch_size // runtime.world_size)
    if steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size {t.batch_size} is larger than the training set "
                          f"({len(splits.train_y)} images)")
    prepare_out_dir(cfg, runtime)
    tracker = Tracker(cfg, runtime)
    placement = distributed.layout(runtime)
    tracker.info(f"senet-job: world_size {runtime.world_size}  nodes {runtime.num_nodes} ({placement})"
                 f"  backend {runtime.backend}"
                 f"  device {runtime.device}  config {config_path or '(defaults)'}  out_dir {t.out_dir}"
                 + (f"  resuming {resume_from} at epoch {state['epoch'] + 1} step {state['step']}" if state else ""))

    torch.manual_seed(t.seed)
    model = senet(cfg.model.depth, width=cfg.model.width, reduction=cfg.model.reduction).to(runtime.device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t, steps_per_epoch)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=t.precision == "fp16")
    # where training stands: epochs done, steps done in the next one and their summed loss/correct/count
    pos = {"epoch": 0, "step": 0, "partial": [0.0, 0.0, 0.0], "best_val_acc": -1.0, "best_epoch": None,
           "history": [], "mlflow_run_id": None}
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        pos = {k: state[k] for k in pos}

    train_model = model
    if runtime.world_size > 1:
        # static_graph: every parameter is used in every step, the graph never changes
        train_model = DistributedDataParallel(model, device_ids=[runtime.device] if runtime.device.type == "cuda"
                                              else None, gradient_as_bucket_view=True, static_graph=True,
                                              bucket_cap_mb=t.bucket_mb)
        if t.grad_compression == "bf16":
            train_model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    eval_model = torch.compile(model) if t.compile else model
    train_model = torch.compile(train_model) if t.compile else train_model
    eval_kw = dict(batch_size=t.eval_batch_size, channels_last=t.channels_last,
                   autocast_dtype=autocast_dtype(t.precision, runtime.device))
    ckpt_dir = checkpoint.directory(t.out_dir)

    def save(*names: str) -> None:
        """Rank 0 writes the state and pos to each named file (the others skip: one writer)."""
        if runtime.is_main:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                     "rng": {"torch": torch.get_rng_state()}, "config": cfg.to_dict(),
                     "world_size": runtime.world_size, **pos}
            for name in names:
                checkpoint.save(state, ckpt_dir / name, keep_previous=name == "last.pt")

    stop = StopSignal(t.stop_signals, runtime.backend)

    def at_step_end(step: int, steps: int, sums: torch.Tensor) -> None:
        stopping = stop.requested()
        if stopping or (t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0 and step < steps):
            totals = sums.clone()
            dist.all_reduce(totals)
            pos.update(step=step, partial=totals.tolist())
            save("last.pt")
        if stopping:
            raise Preempted(f"{stop.received or 'a stop signal on another rank'} at epoch {pos['epoch'] + 1} step {step}")

    pos["mlflow_run_id"] = tracker.open(pos["history"], pos["mlflow_run_id"])
    status = "FAILED"
    try:
        end = t.epochs if t.stop_after_epochs is None else min(t.epochs, pos["epoch"] + t.stop_after_epochs)
        started, first = time.perf_counter(), pos["epoch"]
        for epoch in range(pos["epoch"], end):
            tic = time.perf_counter()
            carried = torch.tensor(pos["partial"] if runtime.is_main else [0.0] * 3, dtype=torch.float64,
                                   device=runtime.device)
            stats = train_one_epoch(train_model, optimizer, scheduler, scaler, splits, cfg, runtime, epoch,
                                    tracker, pos["step"], carried, at_step_end)
            train_s = time.perf_counter() - tic
            val = evaluate(eval_model, splits.val_x, splits.val_y, runtime, **eval_kw)
            val_acc = val.accuracy if val else None
            record = {"epoch": epoch, "train_loss": stats["train_loss"], "train_acc": stats["train_acc"],
                      "val_loss": val.loss if val else None, "val_acc": val_acc,
                      "lr": scheduler.get_last_lr()[0], "images_per_sec": stats["images"] / train_s,
                      "epoch_time_s": time.perf_counter() - tic}
            is_best = val_acc is None or val_acc > pos["best_val_acc"]
            if is_best:
                pos.update(best_val_acc=-1.0 if val_acc is None else val_acc, best_epoch=epoch)
            pos.update(epoch=epoch + 1, step=0, partial=[0.0, 0.0, 0.0])
            pos["history"].append(record)
            save("last.pt", *(["best.pt"] if is_best else []))  # first: the checkpoint is what a resume trusts
            per_epoch = (time.perf_counter() - started) / (epoch + 1 - first)
            tracker.log_epoch(record, t.epochs, eta_s=per_epoch * (t.epochs - epoch - 1))
            if stop.requested():
                raise Preempted(f"{stop.received or 'a stop signal on another rank'} at the end of epoch {epoch + 1}")
        if end < t.epochs:
            tracker.info(f"stopped after epoch {end} of {t.epochs} (train.stop_after_epochs); "
                         f"run again with train.resume=auto to continue")
            status = "KILLED"
            return
        dist.barrier()  # best.pt is complete before any rank reads it
        model.load_state_dict(checkpoint.load(ckpt_dir / "best.pt")["model"])
        test = evaluate(eval_model, splits.test_x, splits.test_y, runtime, **eval_kw)
        best_val = pos["best_val_acc"] if pos["best_val_acc"] >= 0 else None
        tracker.log_final({"test_acc": test.accuracy, "test_loss": test.loss, "best_epoch": pos["best_epoch"],
                           "best_val_acc": best_val, "test_images": test.count},
                          pos["history"], test.confusion, ckpt_dir / "best.pt")
        tracker.register(model, splits.test_x[:4], val_acc=best_val, test_acc=test.accuracy)
        status = "FINISHED"
    except Preempted as e:
        tracker.info(f"preempted: {e}; checkpoint {ckpt_dir / 'last.pt'} written, exiting {PREEMPTED_EXIT_CODE} "
                     f"so that the launcher retries; the next launch resumes")
        status = "KILLED"
        raise
    finally:
        tracker.close(status)


def _warning(message: str) -> None:
    """A warning line on stderr, from global rank 0 only."""
    if distributed.env_rank() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _error(message: str) -> None:
    """One line on stderr, from global rank 0 only (every rank hits the same config or data mistake)."""
    if distributed.env_rank() == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)


@record
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = config.load(args.config, args.overrides)
    except ConfigError as e:
        _error(str(e))
        return 2
    if args.print_config:
        print(config.yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    try:
        runtime = distributed.setup(cfg.train.device, cfg.train.timeout_s)
        host.tune(cfg.train, runtime)
        run(cfg, runtime, args.config)
        return 0
    except USER_ERRORS as e:
        _error(str(e))
        return 2 if isinstance(e, ConfigError) else 1
    except Preempted:
        return PREEMPTED_EXIT_CODE
    except RuntimeError as e:  # torch.distributed's errors derive from it; a timeout is told apart here
        diagnosis = distributed.diagnose_timeout(e, cfg.train.timeout_s)
        if diagnosis is e:
            raise
        print(f"error: {diagnosis}", file=sys.stderr, flush=True)
        raise diagnosis from e  # @record puts it, naming the ranks, in torchrun's error file
    finally:
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
