"""The MLflow model registry: log the best model, register it, and gate promotion to @champion.

The logged model takes what CIFAR-10 stores — uint8 images (N, 3, 32, 32), RGB, 0..255 — and returns
logits (N, 10): it carries its own normalisation, so `mlflow.pytorch.load_model("models:/NAME@champion")`
is usable as is. It is saved in the pickle format with the `senet` package as code, so it loads as a
plain nn.Module (eval(), state_dict()) wherever torch and mlflow are installed.
"""

from pathlib import Path

import torch
from torch import nn

import senet
from job.config import Config
from job.data import MEAN, STD

CHAMPION, CHALLENGER = "champion", "challenger"


def servable(weights: dict, cfg: Config) -> nn.Sequential:
    """A CPU copy of the trained network behind its input normalisation, in eval mode; with train.tta=flip it
    averages each image's logits with its mirror's, so it predicts exactly what the run's test_acc measured."""
    model = senet.senet(cfg.model.depth, width=cfg.model.width, reduction=cfg.model.reduction)
    model.load_state_dict(weights)  # a plain SENet, whatever wrapped it in training (SyncBatchNorm, compile)
    net = senet.FlipAverage(model) if cfg.train.tta == "flip" else model
    return nn.Sequential(senet.Normalize(MEAN, STD), net).eval()


def log_and_register(mlflow, weights: dict, example: torch.Tensor, *, cfg: Config, run_id: str,
                     val_acc: float | None, test_acc: float, tags: dict[str, str]) -> str:
    """Log, register and gate; returns the one line that says what happened and why."""
    from mlflow.models import infer_signature

    wrapped = servable(weights, cfg)
    example = example[:4].cpu()
    with torch.no_grad():
        output = wrapped(example)
    info = mlflow.pytorch.log_model(
        wrapped, name="model", serialization_format="pickle", code_paths=[str(Path(senet.__file__).parent)],
        signature=infer_signature(example.numpy(), output.numpy()), input_example=example.numpy(),
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"])
    name = cfg.mlflow.registered_model
    version = mlflow.register_model(info.model_uri, name).version
    client = mlflow.MlflowClient()
    version_tags = {"val_acc": "" if val_acc is None else str(val_acc), "test_acc": str(test_acc),  # exact
                    "run_id": run_id, **tags}
    for key, value in version_tags.items():
        client.set_model_version_tag(name, version, key, value)
    return promote(client, name, version, val_acc, cfg.mlflow.promote_margin)


def promote(client, name: str, version: str, val_acc: float | None, margin: float) -> str:
    """@champion to version if it beats the champion's val_acc by more than margin (or there is none)."""
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except Exception:  # MLflow raises when the alias does not exist
        champion = None
    where = f"registry: {name} version {version}"
    if val_acc is None:
        client.set_registered_model_alias(name, CHALLENGER, version)
        return f"{where} is @{CHALLENGER}: no validation accuracy (data.val_size=0), so it is not promoted"
    if champion is None:
        client.set_registered_model_alias(name, CHAMPION, version)
        return f"{where} is @{CHAMPION}: there was no champion (val_acc {val_acc:.4f})"
    best = float(champion.tags.get("val_acc") or "-1")
    if val_acc > best + margin:
        client.set_registered_model_alias(name, CHAMPION, version)
        return (f"{where} is @{CHAMPION}: val_acc {val_acc:.4f} beats version {champion.version}'s "
                f"{best:.4f} by more than the margin {margin}")
    client.set_registered_model_alias(name, CHALLENGER, version)
    return (f"{where} is @{CHALLENGER}: val_acc {val_acc:.4f} does not beat @{CHAMPION} version "
            f"{champion.version}'s {best:.4f} by more than the margin {margin}")
