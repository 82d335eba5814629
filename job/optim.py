"""SGD with Nesterov momentum (no weight decay on BatchNorm and biases) and a per-step warmup schedule."""

import math

import torch
from torch import nn

from job.config import TrainConfig


def peak_lr(cfg: TrainConfig) -> float:
    """train.lr scaled linearly from train.ref_batch_size to the global batch size."""
    return cfg.lr * cfg.batch_size / cfg.ref_batch_size


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD over two groups: weights of convs and linear layers decay, 1-d parameters (BN, biases) do not; with
    train.bn_bias_lr_mult != 1 the BatchNorm biases form a third group at that multiple of the learning rate."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    fast = [m.bias for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] \
        if cfg.bn_bias_lr_mult != 1 else []
    no_decay = [p for p in model.parameters() if p.ndim <= 1 and all(p is not q for q in fast)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if fast:  # LambdaLR scales each group's own initial lr, so the multiple holds through the schedule
        groups.append({"params": fast, "weight_decay": 0.0, "lr": peak_lr(cfg) * cfg.bn_bias_lr_mult})
    # fused: one kernel for all parameters (CPU and CUDA), the same update as the for-loop and foreach ones
    return torch.optim.SGD(groups, lr=peak_lr(cfg), momentum=cfg.momentum, nesterov=cfg.momentum > 0, fused=True)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak rate at an optimizer step: linear warmup, then cosine or linear decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1 - progress)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step."""
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, cfg.schedule))


def match_layout(optimizer: torch.optim.Optimizer) -> None:
    """Lay every state tensor out as its parameter is, after load_state_dict: a checkpoint keeps its momentum
    buffers' strides, so a resume that changes train.channels_last would hand fused SGD buffers in another memory
    order than their parameters (an error on CUDA, silently wrong updates on the CPU)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in list(state.items()):
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_strided(p.shape, p.stride(), dtype=value.dtype,
                                                     device=value.device).copy_(value)
