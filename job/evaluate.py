"""Exact distributed evaluation: every image scored once across all ranks, sums all-reduced.

Also a command line that scores a checkpoint or a registered model on the CIFAR-10 test set:
    python -m job.evaluate --model models:/senet18-cifar10@champion        (or under torchrun)
"""

import argparse
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from job import cli, config, data, distributed, registry
from job.checkpoint import CheckpointError
from job.config import ConfigError
from job.data import DataError, eval_shard, normalize
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


def load_model(source: str, runtime: Runtime, tracking_uri: str = "", tta: str = "flip") -> nn.Module:
    """The model behind a checkpoint path, a .pt2 or an MLflow model URI (models:/..., runs:/...), taking uint8
    images with its normalisation inside (job/registry.py load): a checkpoint with train.tta (tta), a registered
    model with the TTA its run used. For a URI, rank 0 alone talks to MLflow and broadcasts the model."""
    if not registry.is_logged(source):
        return registry.load(source, runtime.device, tta=tta)
    box = [None]
    if runtime.is_main:
        try:
            box[0] = registry.load_logged(source, tracking_uri)
        except CheckpointError as e:
            box[0] = str(e)
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise CheckpointError(box[0])
    return box[0].to(runtime.device)


def main(argv: list[str] | None = None) -> int:
    """`python -m job.evaluate --model MODEL [--config FILE] [data.root=...] [train.tta=none]`: test-set accuracy,
    per class. train.tta applies to checkpoints; a registered model predicts with the TTA its run used."""
    parser = argparse.ArgumentParser(prog="python -m job.evaluate", description=main.__doc__)
    parser.add_argument("--model", required=True, help="models:/NAME@champion, runs:/ID/model, or a checkpoint")
    parser.add_argument("--config", help="YAML file (its data and train.device settings are used)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. data.root=/data")
    args = parser.parse_args(argv)
    runtime = None
    try:
        cfg = config.load(args.config, args.overrides)
        runtime = distributed.setup(cfg.train.device, cfg.train.timeout_s)
        model = load_model(args.model, runtime, cfg.mlflow.tracking_uri, cfg.train.tta)
        images, labels = data.load_test(cfg.data, runtime)
        scores = evaluate(model, images, labels, runtime, batch_size=cfg.train.eval_batch_size,
                          normalize_inputs=False)  # the model normalises, and applies its TTA, itself
    except (ConfigError, DataError, CheckpointError, distributed.LaunchError) as e:
        cli.error(str(e))
        return 1
    finally:
        distributed.teardown()
    if runtime.is_main:
        print(f"model {args.model}: test accuracy {scores.accuracy:.4f} on {scores.count} images "
              f"(loss {scores.loss:.4f})")
        for name, acc in zip(data.CLASSES, scores.per_class):
            print(f"  {name:<10} {acc:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
