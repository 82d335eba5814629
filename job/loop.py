"""The training loop's pieces: where training stands (TrainState), what is trained (Parts), one step, one epoch."""

import dataclasses
import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from job import data, optim
from job.averaging import EMA, Lookahead
from job.config import Config
from job.data import Splits
from job.distributed import Runtime

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def native_bf16_cpu() -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (x86 AVX512-BF16 or AMX), as PyTorch's CPU backend sees it."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """train.precision as an autocast dtype (None: fp32); auto is bf16 on CUDA and on CPUs with native bf16
    (measured on the dev split: within 0.3 points of fp32 and several times faster, BENCHMARKS.md), else fp32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" or native_bf16_cpu() else "fp32"
    return AUTOCAST[precision]


def precision_warning(precision: str, device: torch.device) -> str | None:
    """The warning for bf16 asked for by hand on a CPU that only emulates it (None where it is native or not asked)."""
    if precision != "bf16" or device.type != "cpu" or native_bf16_cpu():
        return None
    return ("train.precision=bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX): emulated, 12x slower than "
            "fp32 on a 2-core AVX2 EPYC (1.9 vs 24 images/s at full width, BENCHMARKS.md); train.precision=auto "
            "picks fp32 here")


NARROWEST_CHANNELS_LAST = 8  # model.width below it trains contiguous on the CPU (channels_last_note)


def channels_last_note(channels_last: bool, width: int, device: torch.device) -> str | None:
    """The line for train.channels_last turned off in this launch (None where it stays as asked; the config keeps
    what was asked, build() lays out the model and Parts.channels_last the batches): on the CPU, the backward of a
    stride-2 1x1 convolution with fewer than 8 input channels in channels_last corrupts the heap and aborts the
    process (torch 2.14.1 here, BENCHMARKS.md), and model.width < 8 gives layer2's shortcut such a convolution."""
    if not channels_last or device.type != "cpu" or width >= NARROWEST_CHANNELS_LAST:
        return None
    return (f"train.channels_last off: model.width={width} < {NARROWEST_CHANNELS_LAST} on the CPU trains contiguous "
            f"(torch's channels_last backward of a narrow stride-2 1x1 convolution corrupts memory here)")


@dataclass(kw_only=True)
class TrainState:
    """Where training stands: everything besides the weights and the optimizer that a resume continues from."""

    epoch: int = 0
    """Epochs done."""
    step: int = 0
    """Optimizer steps done in the next epoch (non-zero only in a mid-epoch checkpoint)."""
    partial: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    """Loss sum, correct and count of those steps, over all ranks."""
    best_val_acc: float | None = None
    """The best validation accuracy so far (None: no epoch validated yet, or no validation split)."""
    best_epoch: int | None = None
    """The epoch best.pt holds."""
    history: list[dict] = field(default_factory=list)
    """One record per finished epoch, as in metrics.jsonl."""
    mlflow_run_id: str | None = None
    """The MLflow run this training logs to (reopened on resume)."""

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])

    def end_epoch(self, record: dict) -> bool:
        """Count a finished epoch; True if its model is the best so far (without validation: the latest)."""
        val_acc = record["val_acc"]
        best = val_acc is None or self.best_val_acc is None or val_acc > self.best_val_acc
        if best:
            self.best_val_acc, self.best_epoch = val_acc, record["epoch"]
        self.epoch, self.step, self.partial = record["epoch"] + 1, 0, [0.0, 0.0, 0.0]
        self.history.append(record)
        return best


class StepChannel(Protocol):
    """What train_one_epoch asks of the rest of the job around its steps (job/steps.py StepEnd is the one)."""

    def steps(self, epoch: int, start: int, steps: int) -> Iterable[int]: ...
    def __call__(self, state: TrainState, step: int, steps: int, sums: torch.Tensor) -> None: ...
    def epoch_end(self, epoch: int, start: int) -> None: ...


@dataclass
class Parts:
    """What is trained: the bare model (checkpoints, registry), the wrapped ones that run, and the optimizer's."""

    model: nn.Module
    train_model: nn.Module
    """The model as the training step calls it: DDP and/or compiled."""
    eval_model: nn.Module
    """The model as evaluation calls it (the EMA's when train.ema_mode=average): compiled or bare, never DDP."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: EMA | Lookahead | None = None
    """The weight averaging of train.ema_decay (job/averaging.py)."""
    channels_last: bool = False
    """Whether the model and the batches are in channels_last: train.channels_last, unless channels_last_note
    turns it off."""

    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}
        if self.ema is not None:  # "ema": the averaged weights under the bare model's names; "lookahead": slow ones
            state[self.ema.state_key] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        optim.match_layout(self.optimizer)  # the buffers as this launch lays out the weights (train.channels_last)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state[self.ema.state_key])


def mixer(mixup_alpha: float, cutmix_alpha: float, num_classes: int = 10):
    """torchvision's batch MixUp / CutMix (one of them per batch when both are on); None when both are off."""
    from torchvision.transforms import v2

    mixes = [v2.MixUp(alpha=mixup_alpha, num_classes=num_classes) if mixup_alpha else None,
             v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes) if cutmix_alpha else None]
    mixes = [m for m in mixes if m is not None]
    return None if not mixes else mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def mix(mix_fn, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed images, soft labels) of one batch. torchvision draws from the global CPU generator: it is forked
    and seeded per step, so the mix is a pure function of the step's position (exact resumes)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return mix_fn(x, y)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               x: torch.Tensor, y: torch.Tensor, *, dtype: torch.dtype | None, label_smoothing: float,
               clip_grad_norm: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward under autocast, loss, backward, (clipping,) optimizer step; returns (loss, logits) on the device.

    y holds class indices, or class probabilities (N, classes) after MixUp / CutMix; torchvision's mixed targets
    are mixed one-hot rows, unsmoothed, so label smoothing applies once either way.
    """
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad_norm:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm, foreach=True)
    scaler.step(optimizer)
    scaler.update()
    return loss, logits


def hits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Correct predictions in a batch: for class indices a count; for MixUp / CutMix's soft labels the weight each
    label gives the predicted class (a pair mixed 70/30 scores 0.7 for the first class, 0.3 for the second)."""
    predicted = logits.argmax(1)
    if target.ndim == 1:
        return (predicted == target).sum()
    return target.gather(1, predicted[:, None]).sum()


def train_one_epoch(parts: Parts, splits: Splits, cfg: Config, runtime: Runtime, state: TrainState,
                    on_step: StepChannel) -> dict:
    """This rank's shard of epoch state.epoch from step state.step; loss and accuracy over all ranks.

    on_step is the one channel to the rest of the job (job/steps.py): on_step.steps() gives the step numbers (a
    progress bar), on_step(state, step, steps, sums) runs after every optimizer step (hooks, the stop check, step
    checkpoints, the step clock), on_step.epoch_end() records the step times.
    """
    t = cfg.train
    epoch, start = state.epoch, state.step
    per_rank = t.batch_size // runtime.world_size
    order = data.epoch_indices(len(splits.train_y), t.seed, epoch, runtime.rank, runtime.world_size)
    order = order.to(runtime.device)
    steps = len(order) // per_rank
    dtype = autocast_dtype(t.precision, runtime.device)
    mix_fn = mixer(cfg.data.mixup_alpha, cfg.data.cutmix_alpha)
    flips = data.flips(len(splits.train_y), t.seed, epoch, cfg.data.flip, runtime.device)
    d = cfg.data
    # loss sum, correct, count: what earlier launches counted of this epoch (once, on rank 0), then this one's
    sums = torch.tensor(state.partial if runtime.is_main else [0.0] * 3, dtype=torch.float64, device=runtime.device)
    parts.train_model.train()
    for step in on_step.steps(epoch, start, steps):
        idx = order[step * per_rank:(step + 1) * per_rank]
        g = data.step_generator(t.seed, epoch, step, runtime.rank, runtime.device)
        x = data.augment(splits.train_x[idx], g, d.cutout, padding=d.crop_padding, pad_mode=d.pad_mode,
                         flip=None if flips is None else flips[idx])
        x = data.normalize(x, parts.channels_last)
        y = target = splits.train_y[idx]
        if mix_fn is not None:
            x, target = mix(mix_fn, x, y, data.step_seed(t.seed, epoch, step, runtime.rank, stream=1))
        loss, logits = train_step(parts.train_model, parts.optimizer, parts.scaler, x, target, dtype=dtype,
                                  label_smoothing=t.label_smoothing, clip_grad_norm=t.clip_grad_norm)
        parts.scheduler.step()
        if parts.ema is not None:
            parts.ema.update(epoch * steps + step + 1, t.epochs * steps)
        # in place on the device; no tensor made from a host number (on CUDA that would sync every step)
        sums[0] += loss.detach().double() * len(y)
        sums[1] += hits(logits, target)
        sums[2] += len(y)
        on_step(state, step + 1, steps, sums)
    if parts.ema is not None:
        parts.ema.end_epoch()
    on_step.epoch_end(epoch, start)
    dist.all_reduce(sums)
    loss_sum, correct, count = sums.tolist()
    return {"train_loss": loss_sum / count, "train_acc": correct / count,
            "images": (steps - start) * per_rank * runtime.world_size}
