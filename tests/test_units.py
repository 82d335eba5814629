"""Fast, in-process checks of the pure logic that the end-to-end runs reach only through whole trainings:
the LR schedule, the resume choice, the checkpoint's parts, the TrainState, the promotion gate, the outage queue."""

import math
import os
import time

import pytest
import torch

from job import checkpoint, config, resume
from job.checkpoint import CheckpointError, Checkpointer
from job.config import Config, TrainConfig
from job.distributed import Runtime
from job.loop import Parts, TrainState
from job.optim import build_optimizer, build_scheduler, lr_factor, peak_lr
from job.registry import GATE_TRIES, gate, promote
from job.tracking import Tracker
from senet import senet18
from tests.conftest import ROOT

CPU = Runtime(rank=0, local_rank=0, world_size=1, local_world_size=1, num_nodes=1, device=torch.device("cpu"),
              backend="gloo")
RANK1 = Runtime(rank=1, local_rank=1, world_size=2, local_world_size=2, num_nodes=1, device=torch.device("cpu"),
                backend="gloo")


# ---- LR schedule ---------------------------------------------------------------------------------------------

def test_warmup_rises_linearly_to_the_peak_then_cosine_falls_to_zero():
    total, warmup = 100, 10
    factors = [lr_factor(s, total, warmup, "cosine") for s in range(total)]
    assert factors[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert factors[warmup] == 1.0
    assert factors[55] == pytest.approx(0.5)  # half way through the decay
    assert all(a >= b for a, b in zip(factors[warmup:], factors[warmup + 1:]))
    assert lr_factor(total, total, warmup, "cosine") == pytest.approx(0.0, abs=1e-12)


def test_onecycle_decays_linearly_and_never_goes_negative():
    assert [lr_factor(s, 10, 0, "onecycle") for s in (0, 5, 10, 12)] == pytest.approx([1.0, 0.5, 0.0, 0.0])


def test_no_warmup_starts_at_the_peak():
    assert lr_factor(0, 10, 0, "cosine") == 1.0


def test_scheduler_steps_per_optimizer_step_at_the_linearly_scaled_peak():
    cfg = TrainConfig(lr=0.1, ref_batch_size=128, batch_size=512, epochs=2, warmup_epochs=1.0)
    assert peak_lr(cfg) == pytest.approx(0.4)
    model = senet18(width=4)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=5)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:5] == pytest.approx([0.08, 0.16, 0.24, 0.32, 0.4])
    assert lrs[5] == pytest.approx(0.4) and lrs[9] == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 0.8)))


def test_no_weight_decay_on_batchnorm_and_biases():
    model = senet18(width=4)
    decay, no_decay = build_optimizer(model, TrainConfig()).param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ---- TrainState and the checkpoint's parts --------------------------------------------------------------------

def test_train_state_tracks_the_best_epoch_and_round_trips():
    state = TrainState()
    assert state.best_val_acc is None
    records = [{"epoch": 0, "val_acc": 0.5}, {"epoch": 1, "val_acc": 0.7}, {"epoch": 2, "val_acc": 0.6}]
    assert [state.end_epoch(r) for r in records] == [True, True, False]
    assert (state.epoch, state.step, state.best_epoch, state.best_val_acc) == (3, 0, 1, 0.7)
    copy = TrainState()
    copy.load_state_dict(state.state_dict())
    assert copy == state


def test_without_validation_every_epoch_is_the_latest_best():
    state = TrainState()
    assert [state.end_epoch({"epoch": e, "val_acc": None}) for e in range(3)] == [True, True, True]
    assert state.best_epoch == 2 and state.best_val_acc is None


def parts_of(model: torch.nn.Module) -> Parts:
    optimizer = build_optimizer(model, TrainConfig())
    return Parts(model, model, model, optimizer, build_scheduler(optimizer, TrainConfig(), 3),
                 torch.amp.GradScaler("cpu", enabled=False))


def test_checkpointer_writes_last_and_best_built_from_the_parts(tmp_path):
    parts, state = parts_of(senet18(width=4)), TrainState(epoch=2, best_epoch=1, best_val_acc=0.5)
    writer = Checkpointer(str(tmp_path), CPU, Config().to_dict())
    writer.save(parts, state)
    writer.wait()
    assert not writer.best.exists()
    writer.save(parts, state, best=True)
    with torch.no_grad():  # training goes on while the writer writes: the file holds the state at save()
        parts.model.linear.weight.add_(1.0)
    writer.wait()
    saved = checkpoint.load(writer.best)
    assert set(saved) == set(checkpoint.KEYS)
    assert saved["train_state"] == state.state_dict()
    assert torch.equal(saved["model"]["linear.weight"] + 1.0, parts.model.linear.weight)
    assert all(torch.equal(saved["model"][k], v) for k, v in parts.model.state_dict().items() if k != "linear.weight")
    assert checkpoint.previous(writer.last).is_file()  # the first last.pt, kept as the fallback
    assert writer.best.stat().st_ino == writer.last.stat().st_ino  # best.pt: a link, not a second serialisation
    state.epoch = 3
    writer.save(parts, state)  # the next last.pt replaces the file by a rename: best.pt keeps its bytes
    writer.wait()
    assert checkpoint.load(writer.best)["train_state"]["epoch"] == 2
    assert checkpoint.load(writer.last)["train_state"]["epoch"] == 3


def test_a_failed_background_write_surfaces_at_the_next_save_or_wait(tmp_path, monkeypatch):
    writer = Checkpointer(str(tmp_path), CPU, Config().to_dict())
    parts, state = parts_of(senet18(width=4)), TrainState(epoch=1)
    writer.save(parts, state)
    writer.wait()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    writer.save(parts, TrainState(epoch=2))  # returns at once; the write fails in the thread
    with pytest.raises(CheckpointError, match="No space left on device; the previous one is intact"):
        writer.wait()
    assert checkpoint.load(writer.last)["train_state"]["epoch"] == 1
    writer.save(parts, TrainState(epoch=3))
    with pytest.raises(CheckpointError):
        writer.save(parts, TrainState(epoch=4))  # the next save reports the failed one before writing again


def test_checkpoints_every_n_epochs_and_always_when_a_resume_or_best_pt_needs_one():
    from job.checkpoint import due as checkpoint_due

    due = [e for e in range(10) if checkpoint_due(e, 10, 3, best=False, stopping=False)]
    assert due == [2, 5, 8, 9]  # every third, and the last
    assert checkpoint_due(0, 10, 3, best=True, stopping=False) and checkpoint_due(0, 10, 3, best=False, stopping=True)
    assert [e for e in range(4) if checkpoint_due(e, 4, 1, best=False, stopping=False)] == [0, 1, 2, 3]


def test_other_ranks_write_nothing(tmp_path):
    Checkpointer(str(tmp_path), RANK1, {}).save(parts_of(senet18(width=4)), TrainState(), best=True)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("content", [{"conv1.weight": torch.zeros(1)}, [1, 2]], ids=["bare state_dict", "list"])
def test_files_that_are_not_job_checkpoints_are_refused_in_one_line(tmp_path, content):
    path = tmp_path / "x.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=r"is not a senet-job checkpoint: it has no ") as e:
        checkpoint.load(path)
    assert "\n" not in str(e.value)


# ---- which checkpoint a launch resumes from ----------------------------------------------------------------------

def write(path, epoch: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**{k: {} for k in checkpoint.KEYS}, "train_state": {"epoch": epoch}}, path)


def test_resume_auto_starts_fresh_without_a_checkpoint(tmp_path):
    assert resume.resume_from("auto", str(tmp_path), warn=pytest.fail) is None


def test_resume_auto_takes_last_and_falls_back_to_the_previous_one(tmp_path):
    last = checkpoint.directory(str(tmp_path)) / "last.pt"
    write(last, 2)
    write(checkpoint.previous(last), 1)
    path, state = resume.resume_from("auto", str(tmp_path), warn=pytest.fail)
    assert path == last and state["train_state"]["epoch"] == 2
    last.write_bytes(b"torn")
    warnings = []
    path, state = resume.resume_from("auto", str(tmp_path), warn=warnings.append)
    assert path == checkpoint.previous(last) and state["train_state"]["epoch"] == 1
    assert len(warnings) == 1 and "using the previous checkpoint" in warnings[0]


def test_resume_never_refuses_an_out_dir_with_a_checkpoint(tmp_path):
    write(checkpoint.directory(str(tmp_path)) / "last.pt", 1)
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        resume.resume_from("never", str(tmp_path), warn=pytest.fail)


def test_resume_from_an_explicit_path_does_not_fall_back(tmp_path):
    other = tmp_path / "other.pt"
    write(other, 4)
    assert resume.resume_from(str(other), str(tmp_path / "out"), warn=pytest.fail)[1]["train_state"]["epoch"] == 4
    other.write_bytes(b"torn")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        resume.resume_from(str(other), str(tmp_path / "out"), warn=pytest.fail)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        resume.resume_from(str(tmp_path / "missing.pt"), str(tmp_path / "out"), warn=pytest.fail)


def test_a_checkpoint_of_another_model_shape_is_refused():
    saved = {"config": Config().to_dict()}
    with pytest.raises(CheckpointError, match=r"is for another model: width=64 \(config says 16\)"):
        resume.check_model(saved, {**Config().to_dict()["model"], "width": 16}, "p.pt")


# ---- the promotion gate ---------------------------------------------------------------------------------------

class Registry:
    """The part of MlflowClient that the gate uses: versions with val_acc and data_fingerprint tags, and aliases."""

    def __init__(self, versions: dict[str, float], fingerprints: dict[str, str | None] | None = None):
        self.val_acc = versions
        self.fingerprints = fingerprints or {v: "data-a" for v in versions}
        self.aliases: dict[str, str] = {}

    def get_model_version_by_alias(self, name, alias):
        if alias not in self.aliases:
            raise LookupError(f"no alias {alias}")  # MLflow raises an MlflowException
        version = self.aliases[alias]
        tags = {"val_acc": str(self.val_acc[version])}
        if self.fingerprints[version] is not None:
            tags["data_fingerprint"] = self.fingerprints[version]
        return type("Version", (), {"version": version, "tags": tags})

    def set_registered_model_alias(self, name, alias, version):
        self.aliases[alias] = version


def test_first_version_becomes_champion():
    registry = Registry({"1": 0.8})
    line = promote(registry, "m", "1", 0.8, margin=0.0, fingerprint="data-a")
    assert registry.aliases == {"champion": "1"} and "there was no champion" in line


@pytest.mark.parametrize("new,margin,alias", [(0.85, 0.0, "champion"), (0.8, 0.0, "challenger"),
                                              (0.79, 0.0, "challenger"), (0.85, 0.05, "challenger"),
                                              (0.86, 0.05, "champion")])
def test_champion_moves_only_when_beaten_by_more_than_the_margin(new, margin, alias):
    registry = Registry({"1": 0.8, "2": new})
    registry.aliases["champion"] = "1"
    line = promote(registry, "m", "2", new, margin, fingerprint="data-a")
    assert registry.aliases[alias] == "2" and f"is @{alias}" in line
    assert registry.aliases["champion"] == ("2" if alias == "champion" else "1")


def test_without_validation_a_version_is_never_promoted():
    registry = Registry({"1": 0.8, "2": 0.99})
    registry.aliases["champion"] = "1"
    assert "is not promoted" in promote(registry, "m", "2", None, 0.0, fingerprint="data-a")
    assert registry.aliases == {"champion": "1", "challenger": "2"}


class RacedRegistry(Registry):
    """Another job sets @champion between this gate's read and its write, and MLflow refuses this write."""

    def __init__(self, versions: dict[str, float], raced: int):
        super().__init__(versions)
        self.raced = raced

    def set_registered_model_alias(self, name, alias, version):
        if self.raced:
            self.raced -= 1
            self.aliases["champion"] = "3"  # the other job's version, set first
            raise RuntimeError("BAD_REQUEST: (sqlite3.IntegrityError) UNIQUE constraint failed: registered_model_aliases")
        super().set_registered_model_alias(name, alias, version)


def test_the_gate_tries_again_after_another_job_set_the_alias_and_compares_with_it():
    registry = RacedRegistry({"2": 0.9, "3": 0.95}, raced=1)
    line = gate(registry, "m", "2", 0.9, Config(), "data-a", pause_s=0)
    assert registry.aliases == {"champion": "3", "challenger": "2"}  # the winner stays: it is better
    assert "is @challenger" in line and "version 3's 0.9500" in line
    always = RacedRegistry({"2": 0.9, "3": 0.95}, raced=GATE_TRIES)
    with pytest.raises(RuntimeError, match="UNIQUE constraint failed"):
        gate(always, "m", "2", 0.9, Config(), "data-a", pause_s=0)


@pytest.mark.parametrize("champion_fingerprint", ["data-b", None])
def test_a_version_on_other_data_never_displaces_the_champion(champion_fingerprint):
    """A perfect score on other data (or against a champion from before fingerprints) is not comparable."""
    registry = Registry({"1": 0.8, "2": 1.0}, {"1": champion_fingerprint, "2": "data-a"})
    registry.aliases["champion"] = "1"
    line = promote(registry, "m", "2", 1.0, 0.0, fingerprint="data-a")
    assert registry.aliases == {"champion": "1", "challenger": "2"}
    assert f"fingerprint {champion_fingerprint or 'none'}, this one data-a" in line and "not compared" in line


def test_a_copy_that_is_not_the_verified_original_competes_under_its_own_aliases():
    from job.registry import aliases

    assert aliases(config.load(), "0123456789abcdef") == ("champion", "challenger")
    copy = config.load(overrides=["data.verify=false"])
    assert aliases(copy, "0123456789abcdef") == ("champion-01234567", "challenger-01234567")
    registry = Registry({"1": 0.93, "2": 0.5}, {"1": "original", "2": "0123456789abcdef"})
    registry.aliases["champion"] = "1"
    line = promote(registry, "m", "2", 0.5, 0.0, "0123456789abcdef", aliases(copy, "0123456789abcdef"))
    assert registry.aliases == {"champion": "1", "champion-01234567": "2"} and "@champion-01234567" in line


def test_only_full_cifar10_with_the_standard_split_registers_under_the_production_name():
    from job.registry import model_name, not_production

    assert not_production(config.load().data) is None and model_name(config.load()) == "senet18-cifar10"
    for override in ("data.source=synthetic", "data.train_subset=1000", "data.test_subset=100", "data.val_size=2000"):
        cfg = config.load(overrides=[override])
        assert model_name(cfg) == "senet18-cifar10-dev" and not_production(cfg.data), override
    assert model_name(config.load(str(ROOT / "configs" / "smoke.yaml"))) == "senet18-cifar10-dev"
    final_fit = config.load(overrides=["data.val_size=0"])  # every image trained on: a production candidate
    assert not_production(final_fit.data) is None and model_name(final_fit) == "senet18-cifar10"
    assert model_name(config.load(overrides=["data.verify=false", "data.root=/elsewhere"])) == "senet18-cifar10"


# ---- the MLflow outage queue ------------------------------------------------------------------------------------

class FlakyMlflow:
    """Stands in for the mlflow module: log_metrics fails while `down` is set, else records (step, metrics); every
    call records MLflow's retry setting at that moment."""

    def __init__(self):
        self.down, self.logged, self.tries = False, [], []

    def log_metrics(self, metrics, step=None):
        self.tries.append(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES"))
        if self.down:
            raise ConnectionError("Connection refused\nretries exhausted")
        self.logged.append((step, metrics))


RECORD = {"train_loss": 1.0, "train_acc": 0.5, "val_loss": None, "val_acc": None, "lr": 0.1, "images_per_sec": 1.0,
          "epoch_time_s": 1.0}


def flaky_tracker(tmp_path, flush_timeout_s: int = 300) -> Tracker:
    cfg = Config()
    cfg.train.out_dir, cfg.mlflow.flush_timeout_s = str(tmp_path), flush_timeout_s
    tracker = Tracker(cfg, CPU)
    tracker.run = tracker._new_run()
    tracker.run.mlflow = FlakyMlflow()
    return tracker


def test_a_resume_names_each_change_in_a_tag_that_keeps_its_history():
    from pathlib import Path

    from job.mlflow_run import TAG_LIMIT, extend_history

    def plan(epoch: int, step: int, *changes: str) -> resume.Plan:
        return resume.Plan(Path("c.pt"), {"train_state": {"epoch": epoch, "step": step}}, changes)

    first = plan(2, 0, "data.cutout 0 -> 8").tags()
    assert first == {"changed.data.cutout": "0 -> 8 from epoch 3 (MLflow step 2)"}
    second = plan(4, 7, "data.cutout 8 -> 16", "train.epochs 5 -> 6").tags()  # mid-epoch: the step too
    assert second == {"changed.data.cutout": "8 -> 16 from epoch 5 step 7 (MLflow step 4)",
                      "changed.train.epochs": "5 -> 6 from epoch 5 step 7 (MLflow step 4)"}
    assert plan(3, 0).tags() == {}  # a launch that changes nothing tags nothing
    # a reopened run appends each resume's change to the tag it holds; separators inside values do not matter
    assert extend_history(first["changed.data.cutout"], second["changed.data.cutout"]) == \
        "0 -> 8 from epoch 3 (MLflow step 2); 8 -> 16 from epoch 5 step 7 (MLflow step 4)"
    assert extend_history(None, "/a -> b; c -> /d from epoch 2") == "/a -> b; c -> /d from epoch 2"
    # past MLflow's limit: the first change stays, the oldest after it go, the latest is whole
    value = None
    for i in range(400):
        value = extend_history(value, f"/scratch/job{i} -> /scratch/job{i + 1} from epoch {i + 2}")
    assert len(value) <= TAG_LIMIT and value.startswith("/scratch/job0 -> /scratch/job1 from epoch 2; ...; ")
    assert value.endswith("; /scratch/job399 -> /scratch/job400 from epoch 401")


def test_epochs_queue_while_the_server_is_away_and_go_out_in_order(tmp_path, capsys, monkeypatch):
    for key, value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}.items():
        monkeypatch.setenv(key, value)  # as fail_fast() leaves them when the run opens: QUICK still wins
    tracker = flaky_tracker(tmp_path)
    clock = [1000.0]
    monkeypatch.setattr("job.mlflow_run.time.monotonic", lambda: clock[0])
    tracker.log_epoch({"epoch": 0, **RECORD}, epochs=5, eta_s=0)
    tracker.run.mlflow.down = True
    for epoch in (1, 2, 3):
        tracker.log_epoch({"epoch": epoch, **RECORD}, epochs=5, eta_s=0)
        clock[0] += 4
    assert [r["epoch"] for r in tracker.run.pending] == [1, 2, 3]
    assert len(tracker.run.mlflow.tries) == 2  # epoch 0 went out, epoch 1 failed, epochs 2 and 3 waited out the back-off
    assert tracker.run.mlflow.tries == ["0", "0"]  # one short request each: no MLflow retries inside an epoch
    err = capsys.readouterr().err
    assert err.count("warning: MLflow unreachable (Connection refused)") == 1  # once, first line of the reason
    tracker.run.mlflow.down = False
    clock[0] += 20  # past the (doubled) back-off
    tracker.log_epoch({"epoch": 4, **RECORD}, epochs=5, eta_s=0)
    assert [step for step, _ in tracker.run.mlflow.logged] == [0, 1, 2, 3, 4] and not tracker.run.pending
    assert "val_acc" not in tracker.run.mlflow.logged[0][1]  # None values are not sent
    assert "tracking server is back" in capsys.readouterr().out
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5  # the file has every epoch throughout
    assert tracker.complete


def test_the_end_of_run_flush_waits_once_and_a_stop_signal_ends_it(tmp_path, capsys):
    tracker = flaky_tracker(tmp_path, flush_timeout_s=1)
    tracker.run.mlflow.down = True
    tracker.log_epoch({"epoch": 0, **RECORD}, epochs=1, eta_s=0)
    started = time.monotonic()
    assert not tracker.run._flush() and 1 <= time.monotonic() - started < 5
    started = time.monotonic()
    assert not tracker.run._flush() and time.monotonic() - started < 0.5  # the second call does not wait again
    assert not tracker.complete and tracker.lost == ["1 epoch(s)"]
    assert capsys.readouterr().err.count("still unreachable after 1s: 1 epoch(s) not sent") == 1

    stopped = flaky_tracker(tmp_path / "b", flush_timeout_s=300)
    (tmp_path / "b").mkdir()
    stopped.run.mlflow.down = True
    stopped.log_epoch({"epoch": 0, **RECORD}, epochs=1, eta_s=0)
    stopped.stop = type("Stop", (), {"received": "SIGTERM"})()
    started = time.monotonic()
    assert not stopped.run._flush() and time.monotonic() - started < 0.5
    assert "MLflow SIGTERM received: 1 epoch(s) not sent" in capsys.readouterr().err


def test_a_full_disk_while_drawing_the_figures_is_one_line(tmp_path, monkeypatch):
    import errno

    from job import plots

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plots, "learning_curves", full)
    cfg = Config()
    cfg.train.out_dir = str(tmp_path)
    with pytest.raises(CheckpointError) as info:
        Tracker(cfg, CPU).log_final({"test_acc": 0.5}, [], torch.zeros(10, 10, dtype=torch.int64), tmp_path / "b.pt")
    assert str(info.value) == (f"cannot write the figures in {tmp_path}: No space left on device; the checkpoints "
                               f"and metrics.jsonl are intact")


def test_the_data_folder_is_torchvisions():
    from torchvision.datasets import CIFAR10

    from job import data

    assert data.FOLDER == CIFAR10.base_folder  # job.data names it without importing torchvision


def test_subsets_are_a_fixed_random_pick_not_the_first_images():
    from job.data import _subset

    labels = torch.arange(10).repeat_interleave(1000)  # a test file sorted by class, as the dev split's is
    picked = _subset(len(labels), 2000)
    counts = torch.bincount(labels[picked], minlength=10)
    assert counts.min() > 150 and counts.max() < 250  # every class, about equally
    assert torch.equal(picked, _subset(len(labels), 2000)) and torch.equal(_subset(5, None), torch.arange(5))


def test_a_run_lands_in_its_experiment_when_another_job_created_it_at_the_same_moment(tmp_path, monkeypatch):
    """MLflow's set_experiment, losing the race to create an experiment, returns it without making it active;
    Tracker passes its id to start_run, so the run does not land in "Default" (seen with a Slurm array)."""
    import mlflow
    from mlflow.tracking import _tracking_service

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(tracking_uri=store).create_experiment("raced", artifact_location=str(tmp_path / "a"))
    lookup = _tracking_service.client.TrackingServiceClient.get_experiment_by_name
    calls = []

    def not_yet_then_found(self, name):  # the other job creates it between our lookup and our create
        calls.append(name)
        return None if len(calls) == 1 else lookup(self, name)
    monkeypatch.setattr(_tracking_service.client.TrackingServiceClient, "get_experiment_by_name", not_yet_then_found)
    cfg = Config()
    cfg.train.out_dir, cfg.mlflow.tracking_uri, cfg.mlflow.experiment = str(tmp_path), store, "raced"
    tracker = Tracker(cfg, CPU)
    try:
        tracker._open_mlflow([], None)
        run = mlflow.get_run(tracker.run_id)
    finally:
        mlflow.end_run()
    assert len(calls) >= 2  # the race was taken
    assert run.info.experiment_id == mlflow.MlflowClient(tracking_uri=store).get_experiment_by_name("raced").experiment_id


def test_a_run_that_lost_its_registered_model_is_left_open_for_the_next_launch(tmp_path):
    """A FINISHED run is final (a relaunch would start another run); a finished job that could not log
    everything marks its run FAILED, and the relaunch that ends the job again reopens that same run."""
    import mlflow

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = Config()
    cfg.train.out_dir, cfg.mlflow.tracking_uri, cfg.mlflow.experiment = str(tmp_path), store, "lost"
    first = Tracker(cfg, CPU)
    first._open_mlflow([], None)
    first.lost.append("the registered model")
    first.close("FINISHED")
    client = mlflow.MlflowClient(tracking_uri=store)
    assert client.get_run(first.run_id).info.status == "FAILED"
    again = Tracker(cfg, CPU)
    again._open_mlflow([], first.run_id)
    again.close("FINISHED")
    assert again.run_id == first.run_id and client.get_run(first.run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name("lost").experiment_id])) == 1


# ---- provenance ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the git checkout (not an sdist or an image)")
def test_the_commit_comes_from_git_in_a_checkout_and_from_the_image_outside_one(tmp_path, monkeypatch):
    from job import provenance

    monkeypatch.setenv("SENET_GIT_COMMIT", "f" * 40)
    sha, dirty = provenance.git_commit(ROOT)  # a checkout wins over the environment
    assert len(sha) == 40 and sha != "f" * 40 and dirty in (True, False)
    assert provenance.git_commit(tmp_path) == ("f" * 40, None)  # no checkout: the Dockerfile's GIT_COMMIT
    for unset in ("", "unknown"):  # the build arg's default says nothing
        monkeypatch.setenv("SENET_GIT_COMMIT", unset)
        assert provenance.git_commit(tmp_path) is None
    monkeypatch.setattr(provenance, "git_commit", lambda: ("f" * 40, None))
    tags = provenance.run_tags(Config(), CPU)
    assert tags["git_commit"] == "f" * 40 and "git_dirty" not in tags  # dirty unknown: no tag rather than a guess


# ---- progress lines and the profiler: nothing in the step loop unless asked ------------------------------------

def test_no_progress_hook_unless_a_line_or_a_step_metric_is_asked_for_and_none_on_other_ranks(monkeypatch):
    from job.progress import Progress

    class Tracker:
        sends_to_mlflow = False
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)  # a batch log
    quiet = Config(train=TrainConfig(log_every_s=0, log_every_steps=0))
    assert Progress.build(quiet, CPU, Tracker()) is None
    assert Progress.build(Config(), CPU, Tracker()) is not None  # the default: a line every 30 s
    assert Progress.build(Config(), RANK1, Tracker()) is None
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)  # a terminal has tqdm's bar instead
    assert Progress.build(Config(), CPU, Tracker()) is None


def test_nccl_flight_recorder_dumps_into_the_out_dir_unless_the_launch_names_a_place(tmp_path):
    from job.distributed import flight_recorder_env

    dumps = f"{tmp_path}/nccl_trace/rank_"
    assert flight_recorder_env(tmp_path / "nccl_trace", {}) == {"TORCH_FR_DUMP_TEMP_FILE": dumps,
                                                                 "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": dumps}
    for name in ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"):
        assert flight_recorder_env(tmp_path, {name: "/scratch/fr_"}) == {}


# ---- a resume that changes train.channels_last ------------------------------------------------------------------

@pytest.mark.parametrize("saved_channels_last", [True, False])
def test_a_resume_in_the_other_memory_format_updates_as_foreach_sgd_does(saved_channels_last):
    """A checkpoint keeps its momentum buffers' strides; after Parts.load_state_dict the job's fused SGD must make
    the update that foreach SGD (which reads any strides) makes from the same checkpoint."""
    import io

    from job.loop import train_step

    def model(channels_last: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        m = senet18(width=8)
        return m.to(memory_format=torch.channels_last) if channels_last else m

    def step(parts: Parts, channels_last: bool) -> None:
        x = batch.contiguous(memory_format=torch.channels_last) if channels_last else batch
        train_step(parts.model, parts.optimizer, parts.scaler, x, labels, dtype=None, label_smoothing=0.1)

    batch, labels = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 10
    trained = parts_of(model(saved_channels_last))
    for _ in range(3):
        step(trained, saved_channels_last)
    file = io.BytesIO()
    torch.save(trained.state_dict(), file)

    def saved() -> dict:  # a fresh copy each time: load_state_dict keeps the loaded tensors themselves
        return torch.load(io.BytesIO(file.getvalue()), weights_only=True)

    resumed = parts_of(model(not saved_channels_last))
    resumed.load_state_dict(saved())
    reference = parts_of(model(not saved_channels_last))
    reference.model.load_state_dict(saved()["model"])
    reference.optimizer.load_state_dict(saved()["optimizer"])
    for group in reference.optimizer.param_groups:
        group["fused"], group["foreach"] = False, True
    for p in resumed.model.parameters():
        assert resumed.optimizer.state[p]["momentum_buffer"].stride() == p.stride()
    step(resumed, not saved_channels_last)
    step(reference, not saved_channels_last)
    difference = max((a - b).abs().max().item() for a, b in zip(resumed.model.parameters(),
                                                                 reference.model.parameters()))
    assert difference < 1e-6  # without match_layout: 0.08 here
