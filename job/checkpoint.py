"""Checkpoints: written by rank 0 only, atomically (temp file, fsync, rename), read with weights_only=True."""

import os
import shutil
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from job.cli import first_line
from job.distributed import Runtime, raise_together
from job.durable import previous, sync_dir, write_atomically
from job.outdir import CHECKPOINTS

# what every checkpoint of the job holds; anything else (a bare state_dict, a list) is refused in one line
KEYS = ("model", "optimizer", "scheduler", "scaler", "train_state", "rng", "config", "world_size")
LAST, BEST = "last.pt", "best.pt"  # the files in checkpoints/ (last.prev.pt: job/durable.py previous)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run; the message is one line."""


def directory(out_dir: str) -> Path:
    """Where last.pt and best.pt live."""
    return Path(out_dir) / CHECKPOINTS


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


def due(epoch: int, end: int, every: int, *, best: bool, stopping: bool) -> bool:
    """Whether last.pt is written after epoch (0-based): every `every` epochs, and always at a new best
    (best.pt must hold it), at this launch's last epoch and when stopping (a resume must find it)."""
    return best or stopping or epoch + 1 == end or (epoch + 1) % every == 0


class Checkpointer:
    """last.pt (every save) and best.pt (best=True) of one run, written by rank 0 alone: one writer.

    save() snapshots the state to host memory (what training cannot change any more) and writes it in a
    background thread, so the loop waits for a copy, not for serialisation and fsync; one write at a time.
    wait() returns once the last write is on disk and raises its error if it failed: the stop path, the end
    of training and the test wait, so a preempted or finished run leaves a complete checkpoint. A write that
    failed, however the writer failed, stops every rank at the next save() or wait()."""

    def __init__(self, out_dir: str, runtime: Runtime, config: dict):
        self.last, self.best = directory(out_dir) / LAST, directory(out_dir) / BEST
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
            source = resumed.parent / BEST
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
        if self.world_size > 1 and dist.is_initialized():
            raise_together(error, self.device, CheckpointError(f"rank 0 {what} (its error line says why)"))
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
