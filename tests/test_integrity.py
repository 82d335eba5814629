"""A write that failed is never taken for one that succeeded, and nothing the job reads runs code (issue 20).

The job runs in this process (job.train's main without @record) on TINY settings with a smaller data set: faults
are injected by patching torch.save or the best.pt link, as a full disk or a kill between two renames leaves them.
"""

import errno
import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from job import checkpoint, exported, predict, train
from job.checkpoint import CheckpointError, Checkpointer
from job.config import Config, TrainConfig
from job.distributed import Runtime
from job.loop import Parts, TrainState
from job.optim import build_optimizer, build_scheduler
from senet import senet18
from tests.conftest import TINY, TRACKED, read_metrics, train_state

SMALL = ["data.train_subset=128", "data.val_size=64", "data.test_subset=64"]  # 4 steps an epoch
CPU = Runtime(rank=0, local_rank=0, world_size=1, local_world_size=1, num_nodes=1, device=torch.device("cpu"),
              backend="gloo")
FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"  # what torch.save raises


def parts_of(model: nn.Module) -> Parts:
    optimizer = build_optimizer(model, TrainConfig())
    return Parts(model, model, model, optimizer, build_scheduler(optimizer, TrainConfig(), 3),
                 torch.amp.GradScaler("cpu", enabled=False))


def run(args: list[str]) -> int:
    """job.train in this process."""
    return train.main.__wrapped__(args)  # without @record, which would set up torchrun's fault handler on pytest's


def failing_save(monkeypatch, failure: BaseException, on_call: int = 2) -> None:
    """torch.save writes part of the on_call-th last.pt, then raises failure (the earlier ones are written)."""
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == on_call:
            f.write(b"partial")
            raise failure
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def torch_full_disk() -> RuntimeError:
    """torch.save's own error on a full disk: a RuntimeError raised while the file's OSError is handled."""
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        try:
            raise RuntimeError(FULL_DISK)
        except RuntimeError as e:
            return e


# ---- 1. a failed checkpoint write stops the job ----------------------------------------------------------------

def test_a_full_disk_inside_torch_save_stops_the_job_in_one_line(tmp_path, monkeypatch, capsys):
    """torch.save raises RuntimeError, not OSError, on a full disk: the job stops at the next save (one line, exit 1,
    nothing finished), the temp file is gone, and last.pt / best.pt are the previous, consistent pair."""
    out = tmp_path / "out"
    failing_save(monkeypatch, torch_full_disk())
    assert run([*TINY, *SMALL, "train.epochs=3", f"train.out_dir={out}"]) == 1
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and err.strip().splitlines()[-1] == (
        f"error: cannot write checkpoint {out}/checkpoints/last.pt: No space left on device; "
        f"the previous one is intact")
    assert not (out / "finished.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "last.pt"]  # no .last.pt.tmp
    last = train_state(out / "checkpoints" / "last.pt")
    assert last["epoch"] == 1 and checkpoint.epoch_held(out / "checkpoints" / "best.pt") == last["best_epoch"]
    assert "test_acc" not in (out / "metrics.jsonl").read_text()  # nothing was tested


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full (Linux's always-full device)")
def test_a_real_full_disk_is_reported_and_the_temp_file_removed(tmp_path):
    """The temp file is a link to /dev/full: torch.save meets a real ENOSPC (and raises its RuntimeError; closing the
    file raises the OSError again, which is why this passed before too: the injected faults above are the tests)."""
    writer, parts = Checkpointer(str(tmp_path), CPU, Config().to_dict()), parts_of(senet18(width=4))
    writer.save(parts, TrainState(epoch=1, best_epoch=0), best=True)
    writer.wait()
    (tmp_path / "checkpoints" / ".last.pt.tmp").symlink_to("/dev/full")
    writer.save(parts, TrainState(epoch=2, best_epoch=1), best=True)
    with pytest.raises(CheckpointError) as failed:
        writer.wait()
    assert str(failed.value) == (f"cannot write checkpoint {writer.last}: No space left on device; "
                                 f"the previous one is intact")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert checkpoint.epoch_held(writer.last) == checkpoint.epoch_held(writer.best) == 0


@pytest.mark.parametrize("failure", [ValueError("cannot pickle 'generator' object"), SystemExit(9)],
                         ids=["ValueError", "SystemExit"])
def test_whatever_the_writer_raises_reaches_wait(tmp_path, monkeypatch, failure):
    writer, parts = Checkpointer(str(tmp_path), CPU, Config().to_dict()), parts_of(senet18(width=4))
    writer.save(parts, TrainState(epoch=1, best_epoch=0), best=True)
    writer.wait()
    failing_save(monkeypatch, failure, on_call=1)
    writer.save(parts, TrainState(epoch=2, best_epoch=1), best=True)
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint {writer.last}: .*; the previous one is intact"):
        writer.wait()
    assert writer.durable == 1  # the failed write never counted as on disk
    assert not (tmp_path / "checkpoints" / ".last.pt.tmp").exists()
    assert checkpoint.epoch_held(writer.last) == checkpoint.epoch_held(writer.best) == 0


# ---- 2. best.pt is the epoch the state names ---------------------------------------------------------------------

def test_a_stale_best_pt_left_by_a_crash_between_the_two_renames_is_repaired_from_last_pt(tmp_path, monkeypatch,
                                                                                           capsys):
    """The last epoch's last.pt is renamed into place, then the link of best.pt fails (as a kill there leaves it):
    the relaunch, which has no epoch left to train, must test the best epoch's weights, not the older best.pt."""
    out = tmp_path / "out"
    args = [*TINY, *SMALL, "data.val_size=0", "train.epochs=2", f"train.out_dir={out}"]  # unvalidated: each is best
    real, links = checkpoint.same_file, []

    def killed_before_the_second_link(source, path):
        links.append(path)
        if len(links) == 2:
            raise CheckpointError("killed between the rename of last.pt and the link of best.pt")
        real(source, path)

    monkeypatch.setattr(checkpoint, "same_file", killed_before_the_second_link)
    assert run(args) == 1
    monkeypatch.setattr(checkpoint, "same_file", real)
    best, last = out / "checkpoints" / "best.pt", out / "checkpoints" / "last.pt"
    assert (checkpoint.epoch_held(best), train_state(last)["best_epoch"]) == (0, 1)  # stale
    capsys.readouterr()
    assert run(args) == 0
    err = capsys.readouterr().err
    assert f"warning: {best} held epoch 1, not epoch 2, which the training state names as the best" in err
    assert f"replaced by {last}, which holds it" in err
    assert checkpoint.epoch_held(best) == 1
    tested, trained = checkpoint.load(best)["model"], checkpoint.load(last)["model"]
    assert all(torch.equal(tested[k], trained[k]) for k in trained)
    assert json.loads((out / "finished.json").read_text())["best_epoch"] == 1


def test_best_pt_is_repaired_from_the_previous_checkpoint_or_refused_in_one_line(tmp_path):
    writer, parts = Checkpointer(str(tmp_path), CPU, Config().to_dict()), parts_of(senet18(width=4))
    for epochs, best in ((1, True), (2, False), (3, False)):  # best.pt's link of epoch 2 was lost
        writer.save(parts, TrainState(epoch=epochs, best_epoch=epochs - 1 if best else 1), best=best)
        writer.wait()
    line = writer.check_best(1)
    assert line.startswith(f"{writer.best} held epoch 1, not epoch 2") and "last.prev.pt, which holds it" in line
    assert checkpoint.epoch_held(writer.best) == 1 and writer.check_best(1) is None
    checkpoint.same_file(checkpoint.previous(writer.last), writer.best)  # gone for good: no checkpoint holds epoch 1
    writer.save(parts, TrainState(epoch=4, best_epoch=0))
    writer.wait()
    (tmp_path / "checkpoints" / "best.pt").unlink()
    with pytest.raises(CheckpointError) as refused:
        writer.check_best(1)
    assert str(refused.value) == (
        f"{writer.best} holds nothing readable, but the training state names epoch 2 as the best and no checkpoint "
        f"beside it holds that epoch: its weights are gone, so no test or registration could be trusted; train "
        f"again in a new train.out_dir")


# ---- 3. MLflow gets each epoch once ------------------------------------------------------------------------------

@pytest.mark.slow
def test_an_epoch_goes_to_mlflow_only_once_its_checkpoint_is_on_disk(tmp_path, monkeypatch, capsys):
    """The second epoch's checkpoint never reaches the disk (as a kill during its write leaves it), so the relaunch
    trains that epoch again: MLflow got only the first epoch from the first launch, and then holds each once."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    args = [*TRACKED, *SMALL, "train.epochs=3", f"train.out_dir={out}", f"mlflow.tracking_uri={uri}",
            "mlflow.experiment=once"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("job.tracking.has_module", lambda name: False)  # no system metrics thread: faster
    with monkeypatch.context() as fault:
        failing_save(fault, OSError(errno.ENOSPC, "No space left on device"))
        assert run(args) == 1
    client = mlflow.MlflowClient(tracking_uri=uri)
    (first,) = client.search_runs([client.get_experiment_by_name("once").experiment_id])
    assert [m.step for m in client.get_metric_history(first.info.run_id, "train_loss")] == [0]
    assert first.info.status == "FAILED" and not client.search_model_versions()  # nothing registered
    assert run([*args, "train.stop_after_epochs=1"]) == 0, capsys.readouterr().err  # epoch 2 again, then stop
    assert "resuming" in capsys.readouterr().out
    assert [m.step for m in client.get_metric_history(first.info.run_id, "train_loss")] == [0, 1]
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1]


# ---- 4. an exported .pt2 runs no code ----------------------------------------------------------------------------

class Marker:
    """Unpickled, it creates the file at path: what a tampered payload could do instead."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def pickled_marker(path: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(Marker(path), buffer)
    return buffer.getvalue()


def rewritten(source: Path, target: Path, changes: dict[str, bytes]) -> Path:
    """A copy of the .pt2 archive at source with the records named in changes (below its top folder) replaced or
    added: a tampered file, as anyone who can write to a shared volume or a model store could make it."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        root = old.namelist()[0].split("/")[0]
        for name in old.namelist():
            new.writestr(name, changes.pop(name[len(root) + 1:], None) or old.read(name))
        for name, data in changes.items():
            new.writestr(f"{root}/{name}", data)
    return target


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> Path:
    """A .pt2 as registration exports it (registry.export), of a width-4 SENet behind its normalisation."""
    from job import registry
    from job.data import MEAN, STD
    from senet import Normalize

    path = tmp_path_factory.mktemp("exported") / "model.pt2"
    registry.export(nn.Sequential(Normalize(MEAN, STD), senet18(width=4)).eval(),
                    torch.zeros(2, 3, 32, 32, dtype=torch.uint8), path)
    return path


@pytest.fixture
def image(tmp_path) -> str:
    from PIL import Image

    path = tmp_path / "cat.png"
    Image.new("RGB", (32, 32), (200, 100, 50)).save(path)
    return str(path)


def program(genuine: Path, change) -> bytes:
    """models/model.json of the genuine archive, changed in place by change(tree)."""
    with zipfile.ZipFile(genuine) as archive:
        tree = json.loads(archive.read(f"{archive.namelist()[0].split('/')[0]}/models/model.json"))
    change(tree)
    return json.dumps(tree).encode()


def first_size(tree) -> dict:
    return tree["graph_module"]["graph"]["tensor_values"]["input"]["sizes"][0]["as_expr"]


def tampered(genuine: Path, how: str, marker: Path) -> dict[str, bytes]:
    """The records a tampered archive replaces, each a way torch.export.load runs code (creating marker)."""
    if how == "pickled weight":  # use_pickle: torch.load(weights_only=False)
        with zipfile.ZipFile(genuine) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/data/weights/model_weights_config.json"))
            config = json.loads(archive.read(name))
        config["config"][next(iter(config["config"]))]["use_pickle"] = True
        return {"data/weights/model_weights_config.json": json.dumps(config).encode(),
                "data/weights/weight_0": pickled_marker(marker)}
    if how == "pickled sample inputs":  # weights_only=True fails, then torch falls back to weights_only=False
        return {"data/sample_inputs/model.pt": pickled_marker(marker)}
    if how == "legacy weights":  # data/weights/model.pt is loaded in the old, pickled format
        return {"data/weights/model.pt": pickled_marker(marker)}
    if how == "shape expression":  # sympy.sympify() eval()s it
        return {"models/model.json": program(genuine, lambda tree: first_size(tree).update(
            expr_str=f"__import__('os').system('touch {marker}') or Symbol('s0', positive=True, integer=True)"))}
    if how == "quoted path":  # sympify evaluates a quoted dotted name again: attribute walks from sympy's globals
        return {"models/model.json": program(genuine, lambda tree: first_size(tree).update(
            expr_str="Max('Symbol.__init__.__globals__', 1)"))}
    if how == "guard code":  # exec()ed into the module's guard function, run on every call
        return {"models/model.json": program(genuine, lambda tree: tree.update(
            guards_code=[f"open({str(marker)!r}, 'w') is not None"]))}
    raise ValueError(how)


def test_a_genuine_export_passes_the_check_and_predicts(genuine, image, capsys):
    assert predict.main(["--model", str(genuine), "--device", "cpu", image]) == 0
    assert capsys.readouterr().out.startswith(f"{image}  ")


REASONS = {"pickled weight": "is a pickled payload", "pickled sample inputs": "sample inputs",
           "legacy weights": "holds data/weights/model.pt", "shape expression": "the shape expression",
           "quoted path": "the shape expression", "guard code": "guard code"}


@pytest.mark.parametrize("how", list(REASONS))
def test_a_tampered_export_is_refused_in_one_line_before_it_runs_anything(genuine, image, tmp_path, capsys, how):
    marker = tmp_path / "ran"
    bad = rewritten(genuine, tmp_path / "model.pt2", tampered(genuine, how, marker))
    status = predict.main(["--model", str(bad), "--device", "cpu", image])
    out, err = capsys.readouterr()
    assert not marker.exists(), "the tampered archive ran code"
    assert status == 1 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"error: refusing exported model {bad}: ") and REASONS[how] in err, err


def test_an_archive_rewritten_without_changes_still_passes(genuine, tmp_path):
    """The control for the cases above: rewriting the zip itself is not what they are refused for."""
    copy = rewritten(genuine, tmp_path / "copy.pt2", {})
    exported.check(copy)
    assert exported.load(str(copy)).module()(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 10)


class _Planted:
    """Unpickles to a call of os.system: what a hostile batch file on a shared volume would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["data_batch_3", "test_batch"])
def test_a_cifar_batch_that_carries_code_is_refused_without_running_it(tmp_path, where):
    """data.verify=false reads files no md5 vouches for: a batch naming anything but numpy's array pieces is refused
    in one line, by job.train's reader and by `job.data verify --no-verify`, and its code never runs."""
    import pickle
    import sys

    from job import data

    sys.path.insert(0, str(Path(__file__).parent))
    import fakecifar

    root = tmp_path / "cifar"
    fakecifar.make_cifar10(root, 10, 10)
    data.read_cifar10(str(root))  # the genuine format (Python 2 pickles of numpy arrays) still reads
    marker = tmp_path / "ran"
    path = root / data.FOLDER / where
    path.write_bytes(pickle.dumps({"data": _Planted(marker), "labels": [0]}, protocol=2))
    with pytest.raises(data.DataError) as refused:
        data.read_cifar10(str(root))
    assert str(refused.value).startswith(f"refusing CIFAR-10 file {path}: it refers to posix.system, which a "
                                         f"CIFAR-10 batch never does (code, not data); delete it and")
    assert data.main(["verify", "--root", str(root), "--no-verify"]) == 1
    assert not marker.exists()
