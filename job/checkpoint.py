"""Checkpoints: written by rank 0 only, atomically (temp file, fsync, rename), read with weights_only=True."""

import dataclasses
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch
import torch.distributed as dist

from job.cli import first_line
from job.averaging import MODES
from job.config import Config
from job.distributed import Runtime, all_agree
from job.provenance import NOT_RECIPE

# what every checkpoint of the job holds; anything else (a bare state_dict, a list) is refused in one line
KEYS = ("model", "optimizer", "scheduler", "scaler", "train_state", "rng", "config", "world_size")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run; the message is one line."""


def directory(out_dir: str) -> Path:
    """Where last.pt and best.pt live."""
    return Path(out_dir) / "checkpoints"


def previous(path: Path) -> Path:
    """Where save(..., keep_previous=True) moves the file it replaces."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def write_atomically(path: Path, write: Callable[[BinaryIO], None], keep_previous: bool = False) -> None:
    """path gets what write(file) writes, so that a crash at any moment leaves either the old file or the new
    one (a temp file, fsync, rename, the directory fsynced); whatever write or the filesystem raised, re-raised
    once the temp file is gone.

    keep_previous moves the old file to previous(path) first: a fallback should the new one be unreadable.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous(path))
        os.replace(tmp, path)
        sync_dir(path.parent)
    except BaseException:  # not only OSError: torch.save raises RuntimeError on a full disk
        tmp.unlink(missing_ok=True)
        raise


def save(state: dict, path: Path, keep_previous: bool = False) -> None:
    """Write the checkpoint state to path atomically (write_atomically); any failure is one CheckpointError line."""
    try:
        write_atomically(path, lambda f: torch.save(state, f), keep_previous)
    except Exception as e:  # torch.save wraps a full disk's OSError in "enforce fail at inline_container.cc"
        raise CheckpointError(f"cannot write checkpoint {path}: {cause(e)}; the previous one is intact") from None


def cause(e: BaseException) -> str:
    """Why a write failed, in words: the OSError's (a full disk) where one is in the chain, else the first line."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return f"{first_line(e)} ({type(e).__name__})"


def load(path: str | Path) -> dict:
    """Read a checkpoint of the job onto the CPU; only tensors and plain Python types are accepted."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}): "
                              f"it is corrupt or not a senet-job checkpoint") from None
    missing = [k for k in KEYS if k not in state] if isinstance(state, dict) else list(KEYS)
    if missing:
        raise CheckpointError(f"{path} is not a senet-job checkpoint: it has no {', '.join(missing)} "
                              f"(a bare state_dict? load it with senet18().load_state_dict)")
    return state


def weights(state: dict) -> dict:
    """The weights to predict with: the EMA copy's when the run kept one (ema_mode=average), else the model's
    (with ema_mode=lookahead the model holds the slow weights at every epoch's end)."""
    return state["ema"]["model"] if "ema" in state else state["model"]


class Checkpointer:
    """last.pt (every save) and best.pt (best=True) of one run, written by rank 0 alone: one writer.

    save() snapshots the state to host memory (what training cannot change any more) and writes it in a
    background thread, so the loop waits for a copy, not for serialisation and fsync; one write at a time.
    wait() returns once the last write is on disk and raises its error if it failed: the stop path, the end
    of training and the test wait, so a preempted or finished run leaves a complete checkpoint. A write that
    failed, however the writer failed, stops every rank at the next save() or wait()."""

    def __init__(self, out_dir: str, runtime: Runtime, config: dict):
        self.last, self.best = directory(out_dir) / "last.pt", directory(out_dir) / "best.pt"
        self.writer, self.world_size, self.config = runtime.is_main, runtime.world_size, config
        self.device = runtime.device
        self.thread: threading.Thread | None = None
        self.error: CheckpointError | None = None
        self.durable = 0
        """Epochs done in the newest checkpoint this launch has completely on disk (0: none yet)."""

    def save(self, parts, state, best: bool = False) -> None:
        """The checkpoint built from the states of its parts (weights, optimizer, ...) and the TrainState.
        Every rank calls it: each learns whether the previous write failed."""
        self.wait()  # the previous write first (and its error, if it failed)
        if not self.writer:
            return
        ckpt = snapshot({**parts.state_dict(), "train_state": state.state_dict(),
                         "rng": {"torch": torch.get_rng_state()}, "config": self.config, "world_size": self.world_size})
        self.thread = threading.Thread(target=self._write, args=(ckpt, best), name="checkpoint-writer")
        self.thread.start()

    def adopt_best(self, resumed: Path) -> None:
        """Starting from another run's checkpoint: best.pt here is that run's best.pt (or the checkpoint itself),
        since the best validation accuracy so far, which later epochs must beat, came from there."""
        if self.writer and not self.best.exists():
            source = resumed.parent / "best.pt"
            same_file(source if source.is_file() else resumed, self.best)

    def _write(self, ckpt: dict, best: bool) -> None:
        try:
            save(ckpt, self.last, keep_previous=True)
            if best:
                same_file(self.last, self.best)
        except BaseException as e:  # any: a thread that died of one would leave wait() nothing to raise
            self.error = e if isinstance(e, CheckpointError) else CheckpointError(
                f"cannot write checkpoint {self.last}: {cause(e)}; the previous one is intact")
        else:
            self.durable = ckpt["train_state"]["epoch"]

    def wait(self, raise_error: bool = True) -> None:
        """Block until the write in flight is on disk; raise its error (unless raise_error is False). With
        raise_error every rank calls it, and all of them raise: none goes on alone into a collective."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        error, self.error = self.error, None
        if raise_error:
            self._agree(error, "could not write a checkpoint")

    def _agree(self, error: CheckpointError | None, what: str) -> None:
        """Raise error on rank 0 and a CheckpointError on the others if rank 0 had one (a collective where there
        is a process group)."""
        if self.world_size > 1 and dist.is_initialized() and not all_agree(error is None, self.device):
            raise error or CheckpointError(f"rank 0 {what} (its error line says why)")
        if error is not None:
            raise error

    def check_best(self, best_epoch: int | None, resumed: Path | None = None) -> str | None:
        """Prove that best.pt holds the epoch the TrainState names as the best (best_epoch), and repair it where it
        does not (a crash between the rename of last.pt and the link of best.pt leaves an older one) from a
        checkpoint that holds that epoch: last.pt, last.prev.pt or resumed. Returns the line that says it was
        repaired (None: it was right); every rank calls it, and all raise if no checkpoint holds that epoch."""
        error = line = None
        if self.writer and best_epoch is not None:
            try:
                line = self._repair_best(best_epoch, resumed)
            except CheckpointError as e:
                error = e
        self._agree(error, f"found {self.best} wrong")
        return line

    def _repair_best(self, best_epoch: int, resumed: Path | None) -> str | None:
        held = epoch_held(self.best)
        if held == best_epoch:
            return None
        what = "nothing readable" if held is None else f"epoch {held + 1}"
        for source in (self.last, previous(self.last), resumed):
            if source is not None and epoch_held(source) == best_epoch:
                same_file(source, self.best)
                return (f"{self.best} held {what}, not epoch {best_epoch + 1}, which the training state names as the "
                        f"best (a crash between the writes of last.pt and best.pt?): replaced by {source}, which "
                        f"holds it")
        raise CheckpointError(f"{self.best} holds {what}, but the training state names epoch {best_epoch + 1} as the "
                              f"best and no checkpoint beside it holds that epoch: its weights are gone, so no test "
                              f"or registration could be trusted; train again in a new train.out_dir")


def epoch_ended(train_state: dict) -> int | None:
    """The epoch (0-based) whose end a checkpoint's train state holds; None before the first or mid-epoch."""
    return train_state["epoch"] - 1 if train_state["epoch"] > 0 and not train_state.get("step") else None


def epoch_held(path: Path) -> int | None:
    """epoch_ended of the checkpoint at path; None also if it is missing or unreadable."""
    try:  # mmap: the train state is read, the tensors are not
        return epoch_ended(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["train_state"])
    except Exception:
        return None


def snapshot(tree):
    """A copy of a checkpoint's state in host memory that training can no longer change (tensors cloned)."""
    return torch.utils._pytree.tree_map(
        lambda v: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v, tree)


def same_file(source: Path, path: Path) -> None:
    """Make path hold what source holds, atomically and without serialising again: a hard link (source is
    later replaced by a rename, never rewritten in place, so path keeps these bytes), or a copy where the
    filesystem has no links."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, path)
        sync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}; the previous one is intact") from None


def sync_dir(directory: Path) -> None:
    """fsync a directory: makes the renames in it durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resume_from(resume: str, out_dir: str, warn) -> tuple[Path, dict] | None:
    """(path, state) of the checkpoint to continue from, or None to start fresh, following train.resume.

    `auto` falls back to last.prev.pt (with a warning) when last.pt is missing or unreadable; `never`
    refuses an out_dir that already holds a checkpoint, so that nothing trained is overwritten.
    """
    path = resume_path(resume, out_dir)
    if path is None:
        return None
    try:
        return path, load(path)
    except CheckpointError as e:
        if resume != "auto" or not previous(path).is_file():
            raise
        warn(f"{e}; using the previous checkpoint {previous(path)}")
        return previous(path), load(previous(path))


def resume_path(resume: str, out_dir: str) -> Path | None:
    """The checkpoint file train.resume names (None: start fresh)."""
    last = directory(out_dir) / "last.pt"
    if resume == "auto":
        return last if last.is_file() or previous(last).is_file() else None
    if resume == "never":
        if last.is_file() or previous(last).is_file():
            raise CheckpointError(f"{out_dir} already holds a checkpoint ({last}); use train.resume=auto to "
                                  f"continue it or choose another train.out_dir")
        return None
    if not Path(resume).is_file():
        raise CheckpointError(f"train.resume: checkpoint not found: {resume}")
    if last.is_file() and last.resolve() != Path(resume).resolve():
        # a requeue or restart of a launch that began from another run's checkpoint: go on from this out_dir's
        # own, newer one, not back to where it started
        return last
    return Path(resume)


def check_model(state: dict, model_config: dict, path: Path) -> None:
    """Refuse a checkpoint of a different model shape with one line that says what differs."""
    # a key newer than the checkpoint had its default then (model.bn_momentum, model.zero_init_residual)
    saved = with_defaults(state.get("config", {}))["model"]
    diff = [f"{k}={saved.get(k)} (config says {v})" for k, v in model_config.items() if saved.get(k) != v]
    if diff:
        raise CheckpointError(f"checkpoint {path} is for another model: " + ", ".join(diff))


# Keys a resume may change; they apply from its first step and are named in one line. Any other key of the model,
# data or training recipe that differs from the checkpoint's is refused: the weights, optimizer state, schedule
# or data order in the checkpoint were made with it, so a new value would hold only in config.yaml.
RESUME_APPLIES = {"train.epochs", "train.label_smoothing", "train.clip_grad_norm", "train.tta", "train.precision",
                  "train.sync_bn", "train.eval_batch_size", "data.mixup_alpha", "data.cutmix_alpha", "data.cutout",
                  "data.crop_padding", "data.pad_mode", "data.flip",
                  "data.test_subset", "data.root", "data.download", "data.verify", "data.url", "data.md5"}
# where outputs go and how the launch runs (and how fast), not what is trained: changed silently
RESUME_SILENT = {f"train.{k}" for k in (*NOT_RECIPE, "channels_last", "compile", "reuse_host_memory",
                                        "grad_compression", "bucket_mb", "device")}


def with_defaults(saved: dict) -> dict:
    """A saved config with the keys added to the job since it was written at their defaults, which is what the
    run had then (a checkpoint from before train.bn_bias_lr_mult trained with 1)."""
    defaults = dataclasses.asdict(Config())
    return {section: {**defaults.get(section, {}), **(values if isinstance(values, dict) else {})}
            for section, values in {**defaults, **saved}.items()}


def config_changes(saved: dict, cfg) -> tuple[list[str], list[str]]:
    """("key old -> new" a resume applies, those it refuses) between a saved config and this launch's."""
    applies, refused = [], []
    saved = with_defaults(saved)
    for section, values in cfg.to_dict().items():
        if section == "mlflow":
            continue
        for key, value in values.items():
            name, old = f"{section}.{key}", saved.get(section, {}).get(key, value)
            if old != value and name not in RESUME_SILENT:
                (applies if name in RESUME_APPLIES else refused).append(f"{name} {old} -> {value}")
    return applies, refused


def resume_changes(state: dict, cfg, path: Path) -> list[str]:
    """The settings this launch changes from the checkpoint's ("key old -> new"), after refusing, in one line,
    those a resume cannot honour (job/checkpoint.py RESUME_APPLIES says which it can)."""
    changes, refused = config_changes(state["config"], cfg)
    done = state["train_state"]["epoch"] + (1 if state["train_state"].get("step") else 0)  # a begun epoch counts
    if cfg.train.epochs < done:
        verb = "begun" if state["train_state"].get("step") else "done"
        refused.append(f"train.epochs {cfg.train.epochs} (the checkpoint has {verb} {done} epochs)")
    precisions = {state["config"]["train"].get("precision"), cfg.train.precision}
    if "fp16" in precisions and len(precisions) > 1:
        refused.append("train.precision to or from fp16 (its loss scaler's state does not carry over)")
    if refused:
        raise CheckpointError(f"cannot resume {path} with {'; '.join(refused)}: set it back, or train from "
                              f"scratch in another train.out_dir")
    return changes


def world_size_change(state: dict, world_size: int, batch_size: int, steps: int) -> str | None:
    """The resume line when the checkpoint was written at another world size; None at the same one.

    The global batch is the config's, so steps per epoch and the LR schedule stay (floor(n / batch) at any
    world size), and each epoch's permutation depends on (seed, epoch) only: the first k steps at any world
    size take its first k x batch images, so an interrupted epoch goes on with exactly those not yet seen."""
    was = state["world_size"]
    if was == world_size:
        return None
    epoch, step = state["train_state"]["epoch"], state["train_state"].get("step", 0)
    where = (f"epoch {epoch + 1} goes on at step {step} of {steps} with the images the {was} rank(s) had not "
             f"reached" if step else f"epoch {epoch + 1} starts at its beginning")
    return (f"resume: world size {was} -> {world_size}: per-rank batch {batch_size // was} -> "
            f"{batch_size // world_size} (global {batch_size}, {steps} steps per epoch and the LR schedule "
            f"unchanged); {where}; augmentation draws and BatchNorm batches differ from here on from a run "
            f"that stayed at {was}")


def check_compatible(state: dict, cfg, path: Path) -> None:
    """Before any work: the checkpoint holds the model this config builds, and EMA weights exactly when it
    keeps an EMA (resuming across that would lose them or start from nothing)."""
    check_model(state, cfg.to_dict()["model"], path)
    t, was = cfg.train, state["config"]["train"]
    kept = [mode for mode, averager in MODES.items() if averager.state_key in state]
    if kept != ([t.ema_mode] if t.ema_decay else []):
        said = f"train.ema_decay={was.get('ema_decay', 0.0)}" + (f" ema_mode={kept[0]}" if kept and kept[0] != "average"
                                                                  else "")
        now = f"{t.ema_decay}" + (f" ema_mode={t.ema_mode}" if t.ema_decay and t.ema_mode != "average" else "")
        raise CheckpointError(f"checkpoint {path} was trained with {said}: resume it with the same "
                              f"(this launch has {now})")
