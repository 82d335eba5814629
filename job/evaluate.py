"""Exact distributed evaluation: every image scored once across all ranks, sums all-reduced."""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from job.data import eval_shard, normalize
from job.distributed import Runtime


@dataclass
class Scores:
    """Loss and confusion matrix (rows: true class, columns: predicted) over a whole evaluated set."""

    loss: float
    confusion: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return int(self.confusion.diag().sum()) / self.count

    @property
    def per_class(self) -> list[float]:
        return (self.confusion.diag() / self.confusion.sum(1).clamp(min=1)).tolist()


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, runtime: Runtime, *,
             batch_size: int, num_classes: int = 10, channels_last: bool = False,
             autocast_dtype: torch.dtype | None = None) -> Scores | None:
    """Score this rank's contiguous block of the set, then all-reduce loss sum and confusion counts.

    Returns None for an empty set. Every rank must call it (it is a collective).
    """
    if len(labels) == 0:
        return None
    was_training = model.training
    model.eval()
    shard = eval_shard(len(labels), runtime.rank, runtime.world_size)
    x_all, y_all = images[shard], labels[shard]
    loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=runtime.device)
    for start in range(0, len(y_all), batch_size):
        x = normalize(x_all[start:start + batch_size], channels_last)
        y = y_all[start:start + batch_size]
        with torch.autocast(runtime.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes**2)
    dist.all_reduce(loss_sum)
    dist.all_reduce(confusion)
    model.train(was_training)
    confusion = confusion.view(num_classes, num_classes).cpu()
    return Scores(loss=float(loss_sum) / int(confusion.sum()), confusion=confusion)
