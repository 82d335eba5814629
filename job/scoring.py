"""Exact distributed evaluation: every image scored once across all ranks, loss sums and confusion counts
all-reduced (training's validation and test, and `python -m job.evaluate`)."""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from job.data import eval_shard, normalize
from job.distributed import Runtime
from senet import with_tta


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
             autocast_dtype: torch.dtype | None = None, normalize_inputs: bool = True,
             tta: str = "none") -> Scores | None:
    """Score this rank's contiguous block of the set, then all-reduce loss sum and confusion counts.

    normalize_inputs=False passes the uint8 images as they are (models with their own normalisation).
    tta="flip" scores the mean of the logits of each image and of its horizontal mirror; "multicrop" adds shifted
    pairs (senet.MultiCropAverage).
    Returns None for an empty set. Every rank must call it (it is a collective).
    """
    if len(labels) == 0:
        return None
    if runtime.world_size > 1:
        # BatchNorm statistics drift apart per rank in training (each rank updates them from its own batches):
        # every rank scores with rank 0's, the ones its checkpoint holds
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    was_training = model.training
    model.eval()
    scorer = with_tta(model, tta)
    compiled = isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
    shard = eval_shard(len(labels), runtime.rank, runtime.world_size)
    x_all, y_all = images[shard], labels[shard]
    loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=runtime.device)
    for start in range(0, len(y_all), batch_size):
        x = x_all[start:start + batch_size]
        y = y_all[start:start + batch_size]
        if compiled and len(x) < batch_size:  # one shape for the compiled graph: pad, score, drop the padding
            x = torch.cat([x, x.new_zeros((batch_size - len(x), *x.shape[1:]))])
        x = normalize(x, channels_last) if normalize_inputs else x
        with torch.autocast(runtime.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = scorer(x).float()[:len(y)]  # eval-mode BatchNorm: each image's logits are its own
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        # a one-hot sum, not bincount (which sizes its output from the data: a host sync per batch on CUDA) nor
        # index_add_ (atomics: not deterministic on CUDA): a plain reduction, the same bits on every device
        confusion += F.one_hot(y * num_classes + logits.argmax(1), num_classes**2).sum(0)
    dist.all_reduce(loss_sum)
    dist.all_reduce(confusion)
    model.train(was_training)
    confusion = confusion.view(num_classes, num_classes).cpu()
    return Scores(loss=float(loss_sum) / int(confusion.sum()), confusion=confusion)
