"""(c) The bare model step and (d) the augmentation, each alone, with the project's own code.

The bare step is what job.train's step costs without the framework around it: job.loop.train_step itself
(forward under autocast, label-smoothed loss, backward, optimizer step) with the same model, optimizer
(job.optim's groups, Nesterov), precision, memory format, compilation (static shapes) and process settings
(job.host.tune: cuDNN's autotuner), on one batch that is already augmented, normalised and on the device.
"""

import time

import torch

from bench.common import Mode, summarize
from job import data, synthetic
from job.clock import StepClock
from job.config import TrainConfig
from job.distributed import Runtime
from job.host import keep_freed_memory, tune
from job.loop import AUTOCAST, train_step
from job.optim import build_optimizer
from senet import senet18


def optimizer_for(model: torch.nn.Module, cfg: TrainConfig, implementation: str) -> torch.optim.SGD:
    """job.optim's SGD, or the same groups and hyper-parameters with the foreach or fused implementation."""
    optimizer = build_optimizer(model, cfg)
    if implementation == "default":
        return optimizer
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    d = optimizer.defaults
    return torch.optim.SGD(groups, lr=d["lr"], momentum=d["momentum"], nesterov=d["nesterov"],
                           **{implementation: True})


def bare_step(*, mode: str, batch: int, steps: int, warmup: int, device: str, width: int = 64) -> dict:
    """Images/s of job.loop.train_step on a fixed device-resident batch."""
    mode, device = Mode.parse(mode), torch.device(device)
    malloc_cache = keep_freed_memory() if mode.malloc_cache else None
    cfg = TrainConfig(batch_size=batch, reuse_host_memory=False)  # glibc's setting is the malloc_cache token's
    # job.train's process settings: cuDNN's autotuner on CUDA (every shape is static), intra-op threads
    tune(cfg, Runtime(0, 0, 1, 1, 1, device, "nccl" if device.type == "cuda" else "gloo"))
    torch.manual_seed(cfg.seed)
    model = senet18(width=width).to(device)
    images, labels = synthetic.first(batch, seed=1)
    x = data.normalize(images.to(device), mode.channels_last)
    y = labels.to(device)
    if mode.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = optimizer_for(model, cfg, mode.optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=mode.precision == "fp16")
    step_model = model if mode.compile is None else torch.compile(  # static shapes, as job.train compiles
        model, mode=None if mode.compile == "default" else mode.compile, dynamic=False)
    cudagraphs = device.type == "cuda" and mode.compile in ("reduce-overhead", "max-autotune")
    dtype = AUTOCAST[mode.precision]
    model.train()
    clock = StepClock(device)
    clock.mark()
    for _ in range(warmup + steps):
        if cudagraphs:  # a new iteration: the graphs may reuse the last one's outputs, which nothing keeps
            torch.compiler.cudagraph_mark_step_begin()
        train_step(step_model, optimizer, scaler, x, y, dtype=dtype, label_smoothing=cfg.label_smoothing)
        clock.mark()
    return {**summarize(clock.durations(), warmup, batch), "mode": mode.to_dict(), "malloc_cache_set": malloc_cache}


def augment(*, batch: int, steps: int, warmup: int, device: str, malloc_cache: bool = False) -> dict:
    """Images/s of data.augment + data.normalize on a uint8 batch; and of the job's whole per-step data path
    (index a shard of the epoch's order, a Generator per step, gather, augment, normalise)."""
    device = torch.device(device)
    malloc_cache = keep_freed_memory() if malloc_cache else None
    images, _ = synthetic.first(batch * 4, seed=1)
    images = images.to(device)
    g = torch.Generator(device).manual_seed(0)
    clock = StepClock(device)
    clock.mark()
    for _ in range(warmup + steps):
        data.normalize(data.augment(images[:batch], g))
        clock.mark()
    alone = summarize(clock.durations(), warmup, batch)

    order = data.epoch_indices(len(images), seed=0, epoch=0, rank=0, world_size=1).to(device)
    clock = StepClock(device)
    clock.mark()
    for step in range(warmup + steps):
        idx = order[(step % 4) * batch:(step % 4 + 1) * batch]
        g = data.step_generator(0, 0, step, 0, device)
        data.normalize(data.augment(images[idx], g))
        clock.mark()
    path = summarize(clock.durations(), warmup, batch)
    return {**alone, "job_data_path_images_per_sec": path["images_per_sec"],
            "epoch_indices_s_at_45000": _time_epoch_indices(45000), "malloc_cache_set": malloc_cache}


def _time_epoch_indices(n: int) -> float:
    """Seconds the job spends once per epoch turning DistributedSampler's order into a tensor."""
    tic = time.perf_counter()
    data.epoch_indices(n, seed=0, epoch=0, rank=0, world_size=1)
    return time.perf_counter() - tic
