"""metrics.jsonl and steps.jsonl: their names, record types, writer and reader (readers elsewhere import this).

Both files are JSON lines in train.out_dir, written by rank 0 (metrics.jsonl by job/tracking.py, steps.jsonl by
job/steps.py). Fractions are 0-1; losses are
mean cross-entropy per image in nats; null where there was nothing to measure.

metrics.jsonl schema: one Epoch record per finished epoch, in epoch order, then one Final record once the test
set is scored. Each launch rewrites the file from its checkpoint's history before training, so a resume holds
every epoch once, and a relaunch that tests again has dropped the earlier Final record. A record is told by its
keys: an Epoch record has "epoch", a Final record "test_acc".
  Epoch (keys in this order)
    epoch           int      the finished epoch, counted from 0
    train_loss      float    training loss of the epoch, all ranks (label smoothing and MixUp/CutMix targets
                             as trained; nats per image)
    train_acc       float    fraction of training images the model got right during the epoch (a mixed image
                             counts the weight of the class predicted)
    val_loss        float    validation loss after the epoch (nats per image); null without a validation split
    val_acc         float    validation accuracy after the epoch (fraction); null without a validation split
    lr              float    learning rate of the first parameter group at the epoch's end
    images_per_sec  float    training images per second of the epoch's training time, all ranks together (the
                             steps this launch trained: a resumed epoch counts only its own)
    epoch_time_s    float    seconds of the epoch: training and validation, not the checkpoint
  Final (keys in this order)
    test_acc        float    test accuracy of best.pt's weights, with train.tta (fraction)
    test_loss       float    test loss of the same (nats per image)
    best_epoch      int      the epoch best.pt holds, counted from 0
    best_val_acc    float    its validation accuracy (fraction); null without a validation split
    test_images     int      test images scored

steps.jsonl schema (train.step_times=true only): one Step record per optimizer step, appended at each epoch's end.
  Step (keys in this order)
    epoch           int      the epoch, counted from 0
    step            int      the step within the epoch, counted from 0
    step_s          float    seconds from this step's start to the next's (augmentation, forward, backward,
                             optimizer step and the per-step hooks)
    since_launch_s  float    seconds from the process's start to this step's start; only on a launch's first step
"""

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

METRICS = "metrics.jsonl"
STEPS = "steps.jsonl"


class Epoch(TypedDict):
    """One finished epoch (the module docstring has each field's meaning and unit)."""

    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float | None
    val_acc: float | None
    lr: float
    images_per_sec: float
    epoch_time_s: float


class Final(TypedDict):
    """The test of best.pt, after the last epoch."""

    test_acc: float
    test_loss: float
    best_epoch: int | None
    best_val_acc: float | None
    test_images: int


class _Step(TypedDict):
    epoch: int
    step: int
    step_s: float


class Step(_Step, total=False):
    """One optimizer step's duration."""

    since_launch_s: float


@dataclass
class Records:
    """What metrics.jsonl holds: the epoch records in order, and the final record (None before the test)."""

    epochs: list[Epoch]
    final: Final | None

    @property
    def lines(self) -> list[dict]:
        """Every record in the file's order: the epochs, then the final one."""
        return [*self.epochs, *([self.final] if self.final is not None else [])]


def metrics_path(out_dir: str | Path) -> Path:
    """out_dir's metrics.jsonl."""
    return Path(out_dir) / METRICS


def steps_path(out_dir: str | Path) -> Path:
    """out_dir's steps.jsonl."""
    return Path(out_dir) / STEPS


def append(path: Path, records: Iterable[dict]) -> None:
    """Add records to a JSON-lines file (created if absent), in one write."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    with open(path, "a") as f:
        f.write(text)


def rewrite(path: Path, records: Iterable[dict]) -> None:
    """Replace a JSON-lines file's content with records (metrics.jsonl from a checkpoint's history)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def read_lines(path: Path) -> list[dict]:
    """The records of a JSON-lines file; none for a missing file. Blank lines are skipped, and so is a last line
    cut short (a job killed mid-write, or one still writing); any other line that is not JSON raises ValueError."""
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}, record {i + 1}: not JSON: {line[:80]!r}") from None
    return records


def read(out_dir: str | Path) -> Records:
    """out_dir's metrics.jsonl as epoch records and the final record (no records when there is no file yet)."""
    lines = read_lines(metrics_path(out_dir))
    finals = [r for r in lines if "test_acc" in r]
    return Records(epochs=[r for r in lines if "epoch" in r], final=finals[-1] if finals else None)


def read_steps(out_dir: str | Path) -> list[Step]:
    """out_dir's steps.jsonl (none without train.step_times)."""
    return read_lines(steps_path(out_dir))
