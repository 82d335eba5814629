"""Integrity under hostile or unlucky conditions, in-process where possible: a new MLflow store opened by three
launches at once, a full store, a relaunch after a kill inside registration, unreadable finished.json, YAML and
values that would expand without bound, image files that would decompress without bound."""

import multiprocessing
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

import senet
from job import config, outdir, predict, registry, resume
from job.config import Config, ConfigError
from job.data import Splits
from job.distributed import Runtime
from job.tracking import Tracker

CPU = Runtime(rank=0, local_rank=0, world_size=1, local_world_size=1, num_nodes=1, device=torch.device("cpu"),
              backend="gloo")
EPOCH = {"epoch": 0, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.0, "val_acc": 0.5, "lr": 0.1,
         "images_per_sec": 1.0, "epoch_time_s": 1.0}


@pytest.fixture(scope="module")
def new_store(tmp_path_factory) -> Path:
    """An empty sqlite store, created once: a test copies it (MLflow takes ~3 s to create and migrate one)."""
    import mlflow

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments(max_results=1)
    return path


def tracked(tmp_path, experiment: str, store: Path | None = None) -> Config:
    """A width-8 config whose MLflow store is a sqlite file under tmp_path: a copy of store, or new."""
    if store is not None:
        shutil.copy(store, tmp_path / "mlflow.db")
    cfg = Config()
    cfg.model.width, cfg.mlflow.export_pt2 = 8, False
    cfg.train.out_dir, cfg.mlflow.experiment = str(tmp_path / "out"), experiment
    cfg.mlflow.tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "out").mkdir(exist_ok=True)
    return cfg


# ---- a new sqlite store, three first launches at once (a Slurm array's first use) -----------------------------

def _open_and_report(cfg: Config, barrier, results) -> None:
    import mlflow

    barrier.wait()  # all three reach MLflow's store creation at the same moment
    try:
        tracker = Tracker(cfg, CPU)
        tracker._open_mlflow([], None)
        mlflow.end_run()
        results.put("ok")
    except BaseException as e:  # noqa: BLE001 -- reported to the parent, which fails the test with it
        results.put(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")


def test_three_first_launches_on_a_new_sqlite_store_all_open_their_runs(tmp_path, monkeypatch):
    """MLflow creates and migrates a new sqlite store unguarded: without the lock 2 of 3 failed ("duplicate column
    name: step", "Online migration expected to match one row")."""
    import mlflow  # noqa: F401  (imported before the fork: the children only open the store)

    monkeypatch.chdir(tmp_path)  # the experiment's artifacts: ./mlruns
    monkeypatch.setattr("job.tracking.has_module", lambda name: False)  # no system-metrics threads to fork into
    cfg = tracked(tmp_path, "array")
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(3), context.Queue()
    children = [context.Process(target=_open_and_report, args=(cfg, barrier, results)) for _ in range(3)]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=30)
    assert outcomes == ["ok"] * 3
    assert (tmp_path / "mlflow.db.lock").exists()  # beside the store, on the filesystem every launch sees


# ---- the store's disk fills mid-run ---------------------------------------------------------------------------

def test_a_full_mlflow_store_is_one_warning_line_saying_so(tmp_path, new_store, capsys, monkeypatch):
    import sqlalchemy
    from mlflow.tracking._tracking_service.utils import _get_store

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("job.tracking.has_module", lambda name: False)  # no system-metrics thread: only our lines
    cfg = tracked(tmp_path, "full", new_store)
    tracker = Tracker(cfg, CPU)
    tracker._open_mlflow([], None)
    engine = _get_store().engine

    def full(dbapi, record):  # the store may not grow: sqlite's own "database or disk is full"
        pages = dbapi.execute("PRAGMA page_count").fetchone()[0]
        dbapi.execute(f"PRAGMA max_page_count = {pages}")
    sqlalchemy.event.listen(engine, "connect", full)
    engine.dispose()  # new connections, each with the limit
    capsys.readouterr()
    try:
        for epoch in range(40):  # enough rows to need a new page
            tracker.log_epoch({**EPOCH, "epoch": epoch}, epochs=40, eta_s=0)
            tracker.run.retry_at = 0  # no back-off: every epoch tries the store
        assert tracker.run.pending, "the store never filled: the test proves nothing"
    finally:
        sqlalchemy.event.remove(engine, "connect", full)
        engine.dispose()
        tracker.close("KILLED")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["warning: MLflow store cannot be written (disk full); training goes on, metrics.jsonl keeps "
                     "every epoch, and they are sent when it can be written again"], err[:3000]


# ---- a kill inside registration, then the relaunch ----------------------------------------------------------

class Killed(BaseException):
    """SIGKILL between MLflow's "Successfully registered model" and its model version."""


def test_a_relaunch_after_a_kill_during_registration_logs_one_model_and_test_acc_once(tmp_path, new_store,
                                                                                       monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)  # the experiment's artifacts: ./mlruns
    monkeypatch.setattr("job.tracking.has_module", lambda name: False)
    cfg = tracked(tmp_path, "killed", new_store)
    out = tmp_path / "out"
    config.dump(cfg, out / "config.yaml")
    (out / "best.pt").write_bytes(b"weights")
    weights = senet.senet(**cfg.to_dict()["model"]).state_dict()
    g = torch.Generator().manual_seed(0)
    splits = Splits(*[torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8, generator=g),
                      torch.randint(0, 10, (8,), generator=g)] * 3)
    final = {"test_acc": 0.5, "test_loss": 1.0, "best_epoch": 0, "best_val_acc": 0.5, "test_images": 8}
    confusion = torch.eye(10, dtype=torch.int64)

    first = Tracker(cfg, CPU)
    first._open_mlflow([EPOCH], None)
    first.log_final(final, [EPOCH], confusion, out / "best.pt")
    register_model = mlflow.register_model

    def killed(*args, **kwargs):
        raise Killed
    monkeypatch.setattr(mlflow, "register_model", killed)
    with pytest.raises(Killed):
        first.register(weights, splits, val_acc=0.5, test_acc=0.5)
    mlflow.end_run(status="KILLED")  # what the dead launch left: a run a relaunch reopens
    monkeypatch.setattr(mlflow, "register_model", register_model)

    again = Tracker(cfg, CPU)
    again._open_mlflow([EPOCH], first.run_id)
    again.log_final(final, [EPOCH], confusion, out / "best.pt")
    again.register(weights, splits, val_acc=0.5, test_acc=0.5)
    again.close("FINISHED")
    assert again.run_id == first.run_id and again.complete
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(first.run_id, "test_acc")) == 1
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{first.run_id}'")
    assert len(models) == 1
    assert len(client.search_model_versions(f"name = '{registry.model_name(cfg)}'")) == 1


def test_a_resume_whose_epochs_are_all_done_says_what_is_left():
    from job.resume import Plan

    plan = Plan(Path("runs/x/checkpoints/last.pt"), {})
    assert plan.note(3, 0, 3) == "resuming runs/x/checkpoints/last.pt: all 3 epochs done; testing and registering"
    assert plan.note(1, 4, 3) == "resuming runs/x/checkpoints/last.pt at epoch 2 step 4"


# ---- finished.json that is not a finished run's record ------------------------------------------------------

@pytest.mark.parametrize("text", ["{}", "null", "[1]", '"done"', '{"config": 1, "test_acc": 0.5, "epochs": 1}',
                                  '{"config": {"train": 1}, "test_acc": 0.5, "epochs": 1}',
                                  '{"config": {}, "test_acc": "high", "epochs": 1}',
                                  '{"config": {}, "test_acc": 0.5, "epochs": 1, "mlflow_run_id": 7}',
                                  '{"config": {}, "test_acc": 0.5, "epochs": Infinity}'],
                         ids=["empty", "null", "list", "string", "config-int", "section-int", "acc-string", "run-int",
                              "epochs-inf"])
def test_a_finished_json_of_another_shape_is_one_unreadable_line(tmp_path, text):
    cfg = Config()
    cfg.train.out_dir = str(tmp_path)
    (tmp_path / outdir.FINISHED).write_text(text)
    with pytest.raises(outdir.OutDirError) as info:
        resume.finished_line(cfg)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / outdir.FINISHED} is unreadable (") and "\n" not in message
    assert message.endswith("delete it to run the end of the job again")


def test_a_finished_json_of_this_config_still_reads(tmp_path):
    cfg = Config()
    cfg.train.out_dir = str(tmp_path)
    outdir.mark_finished(str(tmp_path), {"test_acc": 0.5, "epochs": 3, "mlflow_run_id": None,
                                         "config": cfg.to_dict()})
    assert resume.finished_line(cfg) == f"already finished: {tmp_path} (test_acc 0.5000 after 3 epochs); nothing to do"


# ---- configs that would expand without bound ----------------------------------------------------------------

BOMB = ("mlflow:\n  experiment: [&a [x, x, x, x, x, x, x, x, x], &b [*a, *a, *a, *a, *a, *a, *a, *a, *a],\n"
        "    &c [*b, *b, *b, *b, *b, *b, *b, *b, *b], &d [*c, *c, *c, *c, *c, *c, *c, *c, *c],\n"
        "    &e [*d, *d, *d, *d, *d, *d, *d, *d, *d], &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]]\n")


def test_a_yaml_alias_bomb_is_refused_in_one_short_line(tmp_path):
    """Nine to the sixth "x"s from a 300-byte file: the error's repr of it ran out of memory (a 9**9 one after
    20 s); aliases are refused before anything expands."""
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    assert str(info.value) == (f"{path} uses a YAML alias (*a) at line 2: a config has no use for anchors and "
                               f"aliases, and they can expand without bound; write the values out")
    with pytest.raises(ConfigError, match="uses a YAML alias") as info:
        config.load(None, ["mlflow.experiment=[&a [x, x], [*a, *a]]"])
    assert len(str(info.value)) < 200


def test_a_config_file_larger_than_any_config_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("train:\n  epochs: 3\n" + "# padding\n" * 200_000)  # 2 MB
    with pytest.raises(ConfigError, match=r"is 2,000,019 bytes; a config is a few kB \(the limit is 1,048,576\)"):
        config.load(str(path))


@pytest.mark.parametrize("override,shown", [
    ("train.epochs=" + "x" * 100_000, "train.epochs must be an integer, got 'xxxx"),
    ("train.epochs=" + "9" * 5_000, "train.epochs must be an integer, got '9999"),  # past Python's 4300 digits
    ("train.epochs=" + "9" * 4_000, "train.epochs must be below 2**31 in magnitude, got 9999"),
    ("train.stop_signals=[" + "SIGFOO, " * 10_000 + "]", "train.stop_signals[0] must be SIGTERM"),
    ("train.tta=" + "y" * 100_000, "got 'yyyy"),
    ("model.width=[" + "1, " * 10_000 + "]", "model.width must be an integer, got [1, 1"),
], ids=["long-string", "too-many-digits", "huge-int", "long-list", "long-choice", "list-for-int"])
def test_no_config_error_echoes_more_than_a_short_prefix_of_a_value(override, shown):
    with pytest.raises(ConfigError) as info:
        config.load(None, [override])
    message = str(info.value)
    assert shown in message and len(message) < 300 and "\n" not in message, message[:400]


# ---- image files that would decompress without bound --------------------------------------------------------

def png(path, width: int, height: int, rows: bytes = b"") -> str:
    """A PNG of that size (8-bit RGB) whose pixel data is rows, zlib-compressed: a header is all PIL reads first."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return str(path)


class Constant(nn.Module):
    """Logits that always say class 3 (cat)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.full((len(images),), 3), 10).float() * 10


def test_a_decompression_bomb_is_one_error_line_and_the_other_files_are_classified(tmp_path, monkeypatch, capsys):
    from PIL import Image

    good = tmp_path / "cat.png"
    Image.new("RGB", (40, 30), (200, 100, 50)).save(good)
    bomb = png(tmp_path / "bomb.png", 50_000, 50_000, bytes(3 * 50_000 + 1) * 64)  # 2.5 Gpx, 7.5 GB as RGB
    big = png(tmp_path / "big.png", 8193, 8192)  # just over the limit, under PIL's own warning (89 Mpx)
    monkeypatch.setattr(predict, "load", lambda source, device: Constant())
    status = predict.main(["--model", "m.pt2", "--device", "cpu", str(good), bomb, big, str(good)])
    out, err = capsys.readouterr()
    assert status == 1
    assert [line.split("  ")[:2] for line in out.splitlines()] == [[str(good), "cat 1.000"]] * 2
    limit = f"more than the {predict.MAX_PIXELS:,} pixels (64 megapixels) job.predict reads"
    assert err.splitlines() == [f"error: cannot read image {bomb}: {limit}", f"error: cannot read image {big}: {limit}"]
