"""Score a checkpoint or a registered model on the CIFAR-10 test set, every image once across the ranks
(job/scoring.py's evaluate):
    python -m job.evaluate --model models:/senet18-cifar10@champion        (or under torchrun)
"""

import argparse
import sys

import torch.distributed as dist
from torch import nn

from job import cli, config, data, distributed, registry
from job.checkpoint import CheckpointError
from job.config import ConfigError
from job.data import DataError
from job.distributed import Runtime
from job.scoring import evaluate


def load_model(source: str, runtime: Runtime, tracking_uri: str, tta: str) -> nn.Module:
    """The model behind a checkpoint path or an MLflow model URI (models:/..., runs:/...), taking uint8 images with
    its normalisation inside (job/registry.py load): a checkpoint with train.tta (tta), a registered model with the
    TTA its run used. For a URI, rank 0 alone talks to MLflow and broadcasts the model."""
    if source.endswith(".pt2"):  # an exported graph cannot be put in eval mode, which scoring does
        raise CheckpointError(f"{source}: job.evaluate scores a checkpoint or an MLflow model URI; classify images "
                              f"with a .pt2 through python -m job.predict")
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
