"""The MLflow model registry: log the best model, register it, and gate promotion to @champion.

Who may compete: only runs on the full CIFAR-10 source with the standard validation split register under
mlflow.registered_model; synthetic data, subsets and other validation sizes register under `<name>-dev`, so a
smoke run never touches the production name's aliases. Every version carries its data fingerprint (a hash of
the training, validation and test images and labels it saw) and the recipe hash, and a version competes for
@champion only against a champion with the same fingerprint. @champion / @challenger are for md5-verified
CIFAR-10 files; a re-encoded copy (data.verify=false) competes among its own kind under
@champion-<fingerprint> / @challenger-<fingerprint>. Registration is idempotent per MLflow run: a second
attempt finds the run's version (and runs the gate if the first stopped before it).

The logged model takes what CIFAR-10 stores — uint8 images (N, 3, 32, 32), RGB, 0..255 — and returns
logits (N, 10): it carries its own normalisation, so `mlflow.pytorch.load_model("models:/NAME@champion")`
is usable as is. It is saved in the pickle format with the `senet` package as code, so it loads as a
plain nn.Module (eval(), state_dict()) wherever torch and mlflow are installed. Beside it, in the same logged
model's artifacts, lies the same network exported with torch.export (EXPORTED, batch size free): weights as raw
tensor bytes, no pickled code, loadable with `torch.export.load(path).module()` where MLflow is not installed.
torch.export.load trusts the archive (a tampered one can make it unpickle, eval or exec): job/exported.py
checks one before it is loaded.
"""

import random
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import senet
from job.config import Config, DataConfig
from job.data import MEAN, STD

CHAMPION, CHALLENGER = "champion", "challenger"
EXPORTED = "extra_files/model.pt2"  # the torch.export copy, relative to the logged (and registered) model


def servable(weights: dict, model: dict, tta: str) -> nn.Sequential:
    """A CPU copy of the trained network behind its input normalisation and the run's test-time augmentation
    (train.tta: flip, multicrop), in eval mode, so it predicts exactly what the run's test_acc measured.
    model is the config's model section as a dict (depth, width, reduction, ...), as checkpoints hold it."""
    net = senet.senet(**model)
    net.load_state_dict(weights)  # a plain SENet, whatever wrapped it in training (SyncBatchNorm, compile)
    return nn.Sequential(senet.Normalize(MEAN, STD), senet.with_tta(net, tta)).eval()


def is_logged(source: str) -> bool:
    """Whether source names an MLflow model (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model, a URI)
    rather than a file."""
    return "://" in source or source.startswith(("models:/", "runs:/"))


def load_logged(source: str, tracking_uri: str = "") -> nn.Module:
    """The logged (pickle-flavour) model source names, on the CPU; CheckpointError with one line when MLflow
    cannot load it. tracking_uri as mlflow.tracking_uri takes it ("" for $MLFLOW_TRACKING_URI or ./mlflow.db)."""
    import mlflow

    from job.checkpoint import CheckpointError
    from job.cli import first_line
    from job.mlflow_env import tracking_uri as resolve

    mlflow.set_tracking_uri(resolve(tracking_uri))
    try:
        return mlflow.pytorch.load_model(source, map_location="cpu")
    except Exception as e:  # MLflow raises its own and the store's exceptions: the message says which
        raise CheckpointError(f"cannot load model {source}: {first_line(e)}") from None


def load(source: str, device: torch.device, *, tracking_uri: str = "", tta: str | None = None) -> nn.Module:
    """The model behind source on device, taking uint8 images (N, 3, 32, 32) and returning logits, in eval mode:
    an MLflow URI (models:/..., runs:/...: its run's TTA inside), an exported .pt2, or a job checkpoint (built as
    its run registers it: normalisation, and its run's train.tta unless tta names another). CheckpointError with one
    line for what cannot be loaded (job.evaluate and job.predict both load through here)."""
    import os

    from job import checkpoint, exported
    from job.checkpoint import CheckpointError

    if is_logged(source):
        return load_logged(source, tracking_uri).to(device)
    if source.endswith(".pt2"):
        if not os.path.isfile(source):
            raise CheckpointError(f"exported model not found: {source}")
        from torch.export.passes import move_to_device_pass

        program = exported.load(source)  # torch.export.load alone unpickles, eval()s and exec()s what it is given
        # an exported graph holds its tensors' devices: moved by this pass, not by .to()
        return move_to_device_pass(program, device).module()
    state = checkpoint.load(source)
    saved = state["config"]
    return servable(checkpoint.weights(state), saved["model"], tta or saved["train"]["tta"]).to(device)


def export(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Save model as a torch.export program (.pt2) whose batch size is free; example is a uint8 batch."""
    # torch.export fixes a dimension traced at size 1: a batch of at least two keeps it free
    program = torch.export.export(model, (example.repeat(2, 1, 1, 1),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)


def not_production(data: DataConfig) -> str | None:
    """Why a run on these data settings must not register under the production name (None: it may)."""
    if data.source != "cifar10":
        return f"data.source={data.source}"
    if data.train_subset is not None or data.test_subset is not None:
        return "a subset of CIFAR-10 (data.train_subset / data.test_subset)"
    if data.val_size not in (DataConfig.val_size, 0):  # 0: a final fit on every image, registered unpromoted
        return f"data.val_size={data.val_size}, not the standard {DataConfig.val_size}-image validation split"
    return None


def model_name(cfg: Config) -> str:
    """The registry name this run's model goes to: mlflow.registered_model, or `<it>-dev` (not_production)."""
    name = cfg.mlflow.registered_model
    return name if not_production(cfg.data) is None else f"{name}-dev"


def log_and_register(mlflow, weights: dict, example: torch.Tensor, *, cfg: Config, run_id: str,
                     val_acc: float | None, test_acc: float, tags: dict[str, str]) -> str:
    """Log, register and gate; returns the one line that says what happened and why.

    tags must hold data_fingerprint and config_hash (the gate compares the first)."""
    from mlflow.models import infer_signature

    client = mlflow.MlflowClient()
    name = model_name(cfg)
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        version = client.get_model_version(name, existing[0].version)  # search results carry no aliases
        line = f"registry: {name} version {version.version} already holds run {run_id}'s model; not registered again"
        if version.aliases:
            return line
        # registered, then stopped before the gate: the gate now
        return line + "; " + gate(client, name, version.version, val_acc, cfg, tags["data_fingerprint"])
    model_uri = logged_model(client, run_id)  # logged, then killed before its version: registered as it is
    if model_uri is None:
        wrapped = servable(weights, cfg.to_dict()["model"], cfg.train.tta)
        example = example[:4].cpu()
        with torch.no_grad():
            output = wrapped(example)
        with tempfile.TemporaryDirectory() as tmp:
            exported = Path(tmp) / Path(EXPORTED).name
            if cfg.mlflow.export_pt2:
                export(wrapped, example, exported)
            model_uri = mlflow.pytorch.log_model(
                wrapped, name="model", serialization_format="pickle", code_paths=[str(Path(senet.__file__).parent)],
                extra_files=[str(exported)] if cfg.mlflow.export_pt2 else None,
                signature=infer_signature(example.numpy(), output.numpy()), input_example=example.numpy(),
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
            ).model_uri
    version_tags = {"val_acc": "" if val_acc is None else str(val_acc), "test_acc": str(test_acc),  # exact
                    "run_id": run_id, **tags}
    version = mlflow.register_model(model_uri, name, tags=version_tags).version  # tags in the same call
    client.update_model_version(name, version, description=(
        f"SENet{cfg.model.depth} width {cfg.model.width} on {cfg.data.source} (data {tags['data_fingerprint']}, "
        f"recipe {tags['config_hash']}): val_acc {version_tags['val_acc'] or '-'}, test_acc {test_acc:.4f}; "
        f"run {run_id}. Input uint8 (N, 3, 32, 32) RGB, output logits (N, 10)"
        + (f"; the same as a torch.export program, free of pickle, at {EXPORTED}." if cfg.mlflow.export_pt2 else ".")))
    line = gate(client, name, version, val_acc, cfg, tags["data_fingerprint"])
    reason = not_production(cfg.data)
    return line + (f" (under {name}, not {cfg.mlflow.registered_model}: {reason})" if reason else "")


def logged_model(client, run_id: str) -> str | None:
    """The URI of the model ("model") this run logged completely (READY), if it has one: a launch killed between
    logging and registering left it, and the relaunch registers it rather than logging a second."""
    experiment = client.get_run(run_id).info.experiment_id
    found = client.search_logged_models(experiment_ids=[experiment], filter_string=f"source_run_id = '{run_id}'")
    ready = [m for m in found if m.name == "model" and m.status == "READY"]
    return ready[0].model_uri if ready else None


GATE_TRIES = 3


def gate(client, name: str, version: str, val_acc: float | None, cfg: Config, fingerprint: str,
         pause_s: float = 0.5) -> str:
    """promote() with this run's margin and aliases, tried again if it fails: jobs that register under one name
    at once (a Slurm array) race on the alias, and MLflow refuses the second write (sqlite: "UNIQUE constraint
    failed: registered_model_aliases"). Each try reads the champion again, so the retry compares with the winner."""
    def once() -> str:
        return promote(client, name, version, val_acc, cfg.mlflow.promote_margin, fingerprint, aliases(cfg, fingerprint))

    for _ in range(GATE_TRIES - 1):
        try:
            return once()
        except Exception:
            time.sleep(pause_s * (1 + random.random()))  # apart from the other job's retry
    return once()


def aliases(cfg: Config, fingerprint: str) -> tuple[str, str]:
    """(champion, challenger) alias names: `champion` / `challenger` for md5-verified CIFAR-10 files;
    `champion-<fingerprint>` / `challenger-<fingerprint>` for other copies (data.verify=false, a re-encode), so
    each copy's best is found by its own alias and none displaces another's."""
    if cfg.data.verify:
        return CHAMPION, CHALLENGER
    return f"{CHAMPION}-{fingerprint[:8]}", f"{CHALLENGER}-{fingerprint[:8]}"


def promote(client, name: str, version: str, val_acc: float | None, margin: float, fingerprint: str,
            names: tuple[str, str] = (CHAMPION, CHALLENGER)) -> str:
    """@champion to version if it beats the champion's val_acc by more than margin (or there is none); a champion
    trained or scored on other data (another data_fingerprint, or none) is not compared, and stays. names are
    the (champion, challenger) aliases to use (aliases())."""
    top, second = names
    try:
        champion = client.get_model_version_by_alias(name, top)
    except Exception:  # MLflow raises when the alias does not exist
        champion = None
    where = f"registry: {name} version {version}"
    if val_acc is None:
        client.set_registered_model_alias(name, second, version)
        return f"{where} is @{second}: no validation accuracy (data.val_size=0), so it is not promoted"
    if champion is None:
        client.set_registered_model_alias(name, top, version)
        return f"{where} is @{top}: there was no champion (val_acc {val_acc:.4f})"
    theirs = champion.tags.get("data_fingerprint")
    if theirs != fingerprint:
        client.set_registered_model_alias(name, second, version)
        return (f"{where} is @{second}: @{top} version {champion.version} was trained or scored on other "
                f"data (fingerprint {theirs or 'none'}, this one {fingerprint}), so they are not compared; move "
                f"the alias by hand if this one should serve")
    best = float(champion.tags.get("val_acc") or "-1")
    if val_acc > best + margin:
        client.set_registered_model_alias(name, top, version)
        return (f"{where} is @{top}: val_acc {val_acc:.4f} beats version {champion.version}'s "
                f"{best:.4f} by more than the margin {margin}")
    client.set_registered_model_alias(name, second, version)
    return (f"{where} is @{second}: val_acc {val_acc:.4f} does not beat @{top} version "
            f"{champion.version}'s {best:.4f} by more than the margin {margin}")
