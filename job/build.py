"""What is trained, built from the config: the model (whitened stem, SyncBN, channels_last), its weight averaging,
optimizer, schedule and scaler, loaded from a checkpoint when resuming, then wrapped in DDP and compiled; and how
it is scored (the evaluated weights, every image once across the ranks)."""

import dataclasses

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from job import averaging, data
from job.config import Config
from job.distributed import Runtime
from job.launch import use_sync_bn
from job.loop import Parts, autocast_dtype, channels_last_note
from job.optim import build_optimizer, build_scheduler
from job.scoring import Scores, evaluate
from senet import senet

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
    layout = t.channels_last and not channels_last_note(t.channels_last, cfg.model.width, runtime.device)
    if layout:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, t)
    parts = Parts(model, model, model, optimizer, build_scheduler(optimizer, t, steps),
                  torch.amp.GradScaler(runtime.device.type, enabled=t.precision == "fp16"),
                  ema=averaging.build(model, t.ema_decay, t.ema_mode, t.ema_every_steps), channels_last=layout)
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


def score(parts: Parts, images: torch.Tensor, labels: torch.Tensor, cfg: Config, runtime: Runtime) -> Scores | None:
    """Validation or test scores of the evaluated weights (the EMA's when on), every image once across the ranks."""
    t = cfg.train
    return evaluate(parts.eval_model, images, labels, runtime, batch_size=t.eval_batch_size,
                    channels_last=parts.channels_last, autocast_dtype=autocast_dtype(t.precision, runtime.device),
                    tta=t.tta)
