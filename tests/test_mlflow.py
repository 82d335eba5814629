"""MLflow against a real tracking server on 127.0.0.1: one run per job, resumes, the registry gate, outages."""

import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from job import train
from tests.conftest import (ROOT, TINY, TRACKED, Relay, faulty_save_env, free_port, job_env, kill_tree, read_metrics,
                            run_job, start_job, train_state, wait_until)

pytestmark = pytest.mark.slow  # a real mlflow server in most tests (tests/conftest.py SLOW_FIXTURES)


def tracked(server, name: str, *extra: str) -> list[str]:
    """A TINY run tracked at server.uri (a server's or a relay's); without the .pt2 export, which
    tests/test_serving.py checks (~2.5 s a registration)."""
    return [*TRACKED, f"mlflow.tracking_uri={server.uri}", f"mlflow.experiment={name}",
            f"mlflow.registered_model={name}", "mlflow.export_pt2=false", *extra]


def only_run(client, experiment: str):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def steps(client, run_id: str, key: str = "train_loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def probe_env(tmp_path, block_mlflow: bool = False) -> dict:
    """Every process records at exit whether it imported mlflow (a sitecustomize on PYTHONPATH)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import atexit, os, sys\n"
        + ("sys.modules['mlflow'] = None  # `import mlflow` raises ImportError, as if not installed\n"
           if block_mlflow else "")
        + f"def _probe():\n    open(os.path.join({str(tmp_path)!r}, 'rank-' + os.environ.get('RANK', 'none')), 'w')"
        ".write(str('mlflow' in sys.modules and sys.modules['mlflow'] is not None))\n"
        "atexit.register(_probe)\n")
    return job_env(PYTHONPATH=f"{site}{os.pathsep}{ROOT}")


@pytest.fixture(scope="module")
def two_ranks(mlflow_server, tmp_path_factory):
    """(out_dir, probe dir) of one tracked 2-rank run that registers `two-ranks` version 1 (@champion)."""
    tmp = tmp_path_factory.mktemp("two-ranks")
    out = tmp / "out"
    # progress lines, step metrics and the profiler of every rank ride along (they change nothing trained)
    result = run_job(tracked(mlflow_server, "two-ranks", "train.epochs=3", f"train.out_dir={out}",
                             "train.log_every_steps=5", "mlflow.log_every_steps=4", "train.profile=true",
                             "train.profile_ranks=all"), nproc=2, env=probe_env(tmp))
    assert result.returncode == 0, result.stderr[-3000:]
    (tmp / "stdout.txt").write_text(result.stdout)
    assert "registry: two-ranks-dev version 1 is @champion: there was no champion" in result.stdout
    assert "(under two-ranks-dev, not two-ranks: data.source=synthetic)" in result.stdout
    return out, tmp


def test_two_ranks_log_one_run_from_rank_zero_only(mlflow_server, two_ranks, tmp_path):
    out, probes = two_ranks
    assert (probes / "rank-0").read_text() == "True" and (probes / "rank-1").read_text() == "False"

    client = mlflow_server.client()
    run = only_run(client, "two-ranks")
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.epochs"] == "3" and params["model.width"] == "8" and params["data.source"] == "synthetic"
    assert params["train.batch_size"] == "32" and "mlflow.tracking_uri" in params
    tags = run.data.tags
    assert tags["world_size"] == "2" and tags["nodes"] == "1" and tags["device"] == "cpu"
    assert tags["torch"] == torch.__version__ and len(tags["git_commit"]) == 40 and len(tags["config_hash"]) == 12
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_sec", "epoch_time_s"):
        assert steps(client, run.info.run_id, key) == [0, 1, 2], key
    assert run.data.metrics["test_acc"] == read_metrics(out)[-1]["test_acc"] > 0.9
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.jsonl", "learning_curves.png", "confusion_matrix.png", "best.pt"} <= artifacts
    png = client.download_artifacts(run.info.run_id, "confusion_matrix.png", str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    version = client.get_model_version("two-ranks-dev", "1")
    assert version.run_id == run.info.run_id
    assert steps(client, run.info.run_id, "step_train_loss") == list(range(4, 49, 4))  # global steps
    assert float(version.tags["val_acc"]) == read_metrics(out)[-1]["best_val_acc"]
    assert version.tags["run_id"] == run.info.run_id and version.tags["config_hash"] == tags["config_hash"]
    assert float(version.tags["test_acc"]) == run.data.metrics["test_acc"]
    assert len(version.tags["data_fingerprint"]) == 16 and version.tags["data_fingerprint"] in version.description
    assert version.description.startswith("SENet18 width 8 on synthetic") and run.info.run_id in version.description


def test_a_finished_run_relaunched_registers_nothing_and_logs_nothing(mlflow_server, two_ranks):
    out, _ = two_ranks
    client = mlflow_server.client()
    run = only_run(client, "two-ranks")
    versions = len(client.search_model_versions("name = 'two-ranks-dev'"))
    again = run_job(tracked(mlflow_server, "two-ranks", "train.epochs=3", f"train.out_dir={out}"))  # 1 rank: a retry
    assert again.returncode == 0 and again.stdout.startswith(f"already finished: {out} ")
    assert run.info.run_id in again.stdout
    assert len(client.search_model_versions("name = 'two-ranks-dev'")) == versions
    assert len(client.get_metric_history(run.info.run_id, "test_acc")) == 1
    assert only_run(client, "two-ranks").info.status == "FINISHED"


def test_registration_is_idempotent_per_run(mlflow_server, two_ranks):
    """A launch that registered and then died before finished.json is written registers nothing the second time."""
    import mlflow

    from job import config, registry

    out, _ = two_ranks
    client = mlflow_server.client()
    run = only_run(client, "two-ranks")
    mlflow.set_tracking_uri(mlflow_server.uri)
    cfg = config.load(overrides=[*TRACKED, "mlflow.registered_model=two-ranks"])
    weights = torch.load(out / "checkpoints" / "best.pt", weights_only=True)["model"]
    before = len(client.search_model_versions("name = 'two-ranks-dev'"))
    line = registry.log_and_register(mlflow, weights, torch.zeros(4, 3, 32, 32, dtype=torch.uint8), cfg=cfg,
                                     run_id=run.info.run_id, val_acc=1.0, test_acc=1.0,
                                     tags={"config_hash": "x", "data_fingerprint": "y"})
    assert line == f"registry: two-ranks-dev version 1 already holds run {run.info.run_id}'s model; not registered again"
    assert len(client.search_model_versions("name = 'two-ranks-dev'")) == before


def test_a_version_registered_by_a_launch_stopped_before_the_gate_gets_its_alias_on_the_next(mlflow_server):
    import mlflow

    from job import config, registry

    client = mlflow_server.client()
    run_id = client.create_run(client.create_experiment("repair")).info.run_id
    client.create_registered_model("repair-dev")
    client.create_model_version("repair-dev", source=f"runs:/{run_id}/model", run_id=run_id)  # no alias: stopped
    mlflow.set_tracking_uri(mlflow_server.uri)
    cfg = config.load(overrides=[*TRACKED, "mlflow.registered_model=repair"])
    line = registry.log_and_register(mlflow, {}, torch.zeros(1), cfg=cfg, run_id=run_id, val_acc=0.9, test_acc=0.9,
                                     tags={"config_hash": "x", "data_fingerprint": "y"})
    assert line == (f"registry: repair-dev version 1 already holds run {run_id}'s model; not registered again; "
                    f"registry: repair-dev version 1 is @champion: there was no champion (val_acc 0.9000)")
    assert client.get_model_version_by_alias("repair-dev", "champion").version == "1"


def test_another_runs_checkpoint_starts_a_new_mlflow_run_and_leaves_that_one_alone(mlflow_server, two_ranks, tmp_path):
    source, _ = two_ranks
    client = mlflow_server.client()
    original = only_run(client, "two-ranks")
    out = tmp_path / "out"
    result = run_job(tracked(mlflow_server, "branch", "train.epochs=4", f"train.out_dir={out}",
                             f"train.resume={source}/checkpoints/last.pt"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train.epochs 3 -> 4" in result.stdout
    branch = only_run(client, "branch")
    assert branch.info.run_id != original.info.run_id
    assert branch.data.tags["resumed_from"] == str((source / "checkpoints" / "last.pt").resolve())
    after = client.get_run(original.info.run_id)
    assert after.info.status == "FINISHED" and after.info.end_time == original.info.end_time
    assert steps(client, original.info.run_id) == [0, 1, 2]  # nothing written into the other run
    assert steps(client, branch.info.run_id) == [0, 1, 2, 3]  # its history came along, then epoch 4


def test_a_smoke_run_never_touches_the_production_names_champion(mlflow_server, tmp_path):
    """Against a registry whose production name holds a real champion: the README's first command registers
    under `<name>-dev`, and the production champion and its aliases stay as they were."""
    client = mlflow_server.client()
    client.create_registered_model("prod")
    trained = client.create_run(client.create_experiment("real-training")).info.run_id
    real = client.create_model_version("prod", source=f"runs:/{trained}/model", run_id=trained,
                                       tags={"val_acc": "0.93", "data_fingerprint": "real-data"})
    client.set_registered_model_alias("prod", "champion", real.version)
    result = run_job(["--config", "configs/smoke.yaml", f"mlflow.tracking_uri={mlflow_server.uri}",
                      "mlflow.experiment=smoke", "mlflow.registered_model=prod", f"train.out_dir={tmp_path}/smoke"])
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("registry:")]
    assert line.startswith("registry: prod-dev version 1 is @champion") and "data.source=synthetic" in line
    assert client.get_model_version_by_alias("prod", "champion").version == real.version
    assert len(client.search_model_versions("name = 'prod'")) == 1
    assert client.get_registered_model("prod").aliases == {"champion": real.version}


def test_a_deleted_experiment_is_one_line_or_a_warning_when_not_required(mlflow_server, tmp_path):
    client = mlflow_server.client()
    client.delete_experiment(client.create_experiment("deleted"))
    args = [*tracked(mlflow_server, "deleted", "train.epochs=1")]
    failed = run_job([*args, f"train.out_dir={tmp_path}/a"])
    assert failed.returncode == 1 and not (tmp_path / "a" / "checkpoints").exists()
    assert failed.stderr.strip().startswith("error: MLflow experiment 'deleted' cannot be used: ")
    assert failed.stderr.strip().count("\n") == 0
    lenient = run_job([*args, "mlflow.required=false", f"train.out_dir={tmp_path}/b"])
    assert lenient.returncode == 0, lenient.stderr[-2000:]
    assert "warning: MLflow experiment 'deleted' cannot be used" in lenient.stderr and "mlflow.required=false" in lenient.stderr


def test_a_run_deleted_under_a_resumable_job_gives_a_new_run(mlflow_server, tmp_path):
    out = tmp_path / "out"
    args = tracked(mlflow_server, "deleted-run", "train.epochs=2", f"train.out_dir={out}")
    assert run_job([*args, "train.stop_after_epochs=1"]).returncode == 0
    client = mlflow_server.client()
    first = only_run(client, "deleted-run").info.run_id
    client.delete_run(first)
    resumed = run_job(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"warning: MLflow run {first} of the checkpoint was deleted; starting a new run" in resumed.stderr
    run = only_run(client, "deleted-run")  # search_runs leaves deleted runs out
    assert run.info.run_id != first and run.data.tags["continues_run"] == first
    assert steps(client, run.info.run_id) == [0, 1]


def test_a_registry_name_mlflow_would_refuse_is_refused_before_training(tmp_path):
    result = run_job([*TRACKED, "mlflow.registered_model=team/senet", f"train.out_dir={tmp_path}/out"])
    assert result.returncode == 2 and not (tmp_path / "out").exists()
    assert result.stderr.strip() == ("error: mlflow.registered_model 'team/senet' is not a name MLflow accepts "
                                     "(non-empty, no '/', ':' or quotes, no surrounding spaces, at most 250 "
                                     "characters)")


def test_registered_champion_predicts_like_the_checkpoint(mlflow_server, two_ranks):
    import mlflow

    from job.data import normalize
    from job.synthetic import first as synthetic
    from senet import FlipAverage, senet18

    out, _ = two_ranks
    mlflow.set_tracking_uri(mlflow_server.uri)
    served = mlflow.pytorch.load_model("models:/two-ranks-dev/1")
    assert isinstance(served, torch.nn.Module)
    served.eval()  # a plain module, not an exported graph
    images, _ = synthetic(300, seed=99)  # images the run has not seen
    bare = senet18(width=8)
    bare.load_state_dict(torch.load(out / "checkpoints" / "best.pt", weights_only=True)["model"])
    bare.eval()
    with torch.no_grad():  # the run's train.tta (flip, the default) travels with the registered model
        expected = FlipAverage(bare)(normalize(images))
        assert torch.allclose(served(images), expected, atol=1e-5)
        assert not torch.allclose(bare(normalize(images)), expected, atol=1e-5)
    # and the CLI scores it on the test set, as documented
    cli = run_job(["--model", "models:/two-ranks-dev/1", f"mlflow.tracking_uri={mlflow_server.uri}",
                   "data.source=synthetic", "data.test_subset=500"], module="job.evaluate")
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert "test accuracy" in cli.stdout and cli.stdout.count("\n") == 11  # overall + 10 classes


def test_a_weaker_model_becomes_challenger_and_the_champion_stays(mlflow_server, two_ranks, tmp_path):
    """The gate end to end (its every branch is in test_units.py): a barely trained model against version 1."""
    weak = [*TRACKED, f"mlflow.tracking_uri={mlflow_server.uri}", "mlflow.experiment=gate",
            "mlflow.registered_model=two-ranks", "train.epochs=1", "train.lr=0.0005", f"train.out_dir={tmp_path}"]
    result = run_job(weak)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("registry:")]
    assert line.startswith("registry: two-ranks-dev version 2 is @challenger: val_acc ")
    assert "does not beat @champion version 1" in line
    client = mlflow_server.client()
    assert client.get_model_version_by_alias("two-ranks-dev", "champion").version == "1"
    assert client.get_model_version_by_alias("two-ranks-dev", "challenger").version == "2"


def test_killed_after_an_epoch_and_resumed_keeps_one_run(mlflow_server, tmp_path):
    out = tmp_path / "out"
    args = tracked(mlflow_server, "resumed", "train.epochs=4", f"train.out_dir={out}")
    proc = start_job(args, nproc=2, output=subprocess.DEVNULL)
    wait_until(lambda: train_state(out / "checkpoints" / "last.pt").get("epoch", 0) >= 1, proc=proc,
               what="epoch 1's checkpoint")
    kill_tree(proc.pid)  # no chance to clean up: the worst case
    proc.wait()
    client = mlflow_server.client()
    killed = only_run(client, "resumed")
    assert killed.info.status == "RUNNING"  # not FINISHED: resumable
    stopped = train_state(out / "checkpoints" / "last.pt")
    where = (f"epoch {stopped['epoch'] + 1}" + (f" step {stopped['step']}" if stopped.get("step") else "")
             + f" (MLflow step {stopped['epoch']})")

    result = run_job([*args, "data.cutout=4"], nproc=2)  # a key a resume may change: the run says so in a tag
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(client, "resumed")
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.params["data.cutout"] == "0"  # MLflow keeps a param's first value
    assert run.data.tags["changed.data.cutout"] == f"0 -> 4 from {where}"
    assert not any(t.startswith("changed.") and t != "changed.data.cutout" for t in run.data.tags)
    for key in ("train_loss", "val_acc", "lr"):
        assert steps(client, run.info.run_id, key) == [0, 1, 2, 3], key  # each epoch once
    assert [r.get("epoch") for r in read_metrics(out)] == [0, 1, 2, 3, None]


@pytest.mark.parametrize("uri", ["http://127.0.0.1:{port}", "foo://nowhere"])
def test_unreachable_or_malformed_server_fails_before_training(tmp_path, uri):
    uri = uri.format(port=free_port())
    out = tmp_path / "out"
    result = run_job([*TRACKED, f"mlflow.tracking_uri={uri}", f"train.out_dir={out}"])
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"error: MLflow tracking URI {uri} cannot be used:"), errors
    assert not (out / "checkpoints").exists() and "epoch 1/" not in result.stdout


def test_not_required_trains_without_the_server(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "out"
    result = run_job([*TRACKED, f"mlflow.tracking_uri={uri}", "mlflow.required=false", "train.epochs=1",
                      f"train.out_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: MLflow tracking URI" in result.stderr and "mlflow.required=false" in result.stderr
    assert "test_acc" in read_metrics(out)[-1]


def test_runs_where_mlflow_is_not_installed(tmp_path):
    out = tmp_path / "out"
    result = run_job([*TINY, "train.epochs=1", f"train.out_dir={out}"], env=probe_env(tmp_path, block_mlflow=True))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "rank-none").read_text() == "False"
    assert "test_acc" in read_metrics(out)[-1]


def test_credentials_come_from_the_environment_and_never_reach_params_logs_or_files(mlflow_server, tmp_path):
    out = tmp_path / "out"
    result = run_job([*tracked(mlflow_server, "secret", "train.epochs=1", f"train.out_dir={out}")],
                     env=job_env(MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD="hunter2-token"))
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(mlflow_server.client(), "secret")
    texts = [result.stdout, result.stderr, (out / "config.yaml").read_text(), json.dumps(run.data.params),
             json.dumps(run.data.tags), str(torch.load(out / "checkpoints" / "last.pt", weights_only=True)["config"])]
    assert not any("hunter2" in text for text in texts)


def test_a_password_in_the_uri_is_refused(tmp_path, capsys):
    uri = "http://alice:s3cret@127.0.0.1:5000"
    # a config mistake, refused before any work: job.train's main() in this process (tests/test_config.py shows
    # that path through a real process)
    assert train.main.__wrapped__([*TRACKED, f"mlflow.tracking_uri={uri}", f"train.out_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: mlflow.tracking_uri http://alice:***@127.0.0.1:5000 holds a password: set MLFLOW_TRACKING_USERNAME "
        "and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment instead")
    env = job_env(MLFLOW_TRACKING_URI=uri)  # the same from the environment: refused once MLflow is set up
    result = run_job([*(a for a in TINY if a != "mlflow.enabled=false"), f"train.out_dir={tmp_path}"], env=env)
    assert result.returncode == 1 and "s3cret" not in result.stderr + result.stdout
    assert "error: MLflow tracking URI http://alice:***@127.0.0.1:5000 holds a password" in result.stderr


def start_behind_relay(mlflow_server, tmp_path, name: str, *extra: str):
    """(relay, out_dir, job) of a job tracked through a relay to the server (conftest.Relay), which the test cuts
    as a server that goes away and restores as one that comes back."""
    relay = Relay(mlflow_server.port)
    out = tmp_path / "out"
    return relay, out, start_job(tracked(relay, name, *extra, f"train.out_dir={out}"))


def test_server_gone_mid_run_loses_nothing(mlflow_server, tmp_path):
    relay, out, proc = start_behind_relay(mlflow_server, tmp_path, "outage", "train.epochs=6",
                                          "mlflow.flush_timeout_s=180")
    try:
        wait_for_epoch(out, 0, proc)
        relay.cut()
        wait_for_epoch(out, 2, proc)  # epochs 1 and 2 run while the server is away
        relay.restore()
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        assert stderr.count("warning: MLflow unreachable") == 1
        client = mlflow_server.client()
        run = only_run(client, "outage")
        assert run.info.status == "FINISHED"
        for key in ("train_loss", "val_acc", "epoch_time_s"):
            assert steps(client, run.info.run_id, key) == [0, 1, 2, 3, 4, 5], key
        assert "test_acc" in run.data.metrics
    finally:
        kill_tree(proc.pid)
        relay.close()


def test_server_gone_for_good_ends_in_one_bounded_wait_that_sigterm_cuts_short_and_exit_3(mlflow_server, tmp_path):
    relay, out, proc = start_behind_relay(mlflow_server, tmp_path, "gone", "train.epochs=3",
                                          "mlflow.flush_timeout_s=600")
    try:
        wait_for_epoch(out, 0, proc)
        relay.cut()
        wait_until(lambda: "test_acc" in (out / "metrics.jsonl").read_text(), proc=proc, what="the final record")
        time.sleep(2)  # inside the end-of-run flush, which would wait mlflow.flush_timeout_s (10 minutes)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        kill_tree(proc.pid)
        relay.close()
    assert proc.returncode == 3, stderr[-3000:]
    assert stderr.count("warning: MLflow SIGTERM received:") == 1 and "still unreachable" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: not everything reached MLflow (")
    assert "exiting 3" in stderr and read_metrics(out)[-1]["test_acc"] > 0  # everything is on disk


def wait_for_epoch(out, epoch: int, proc) -> None:
    path = out / "metrics.jsonl"
    wait_until(lambda: path.exists() and any(json.loads(x).get("epoch") == epoch for x in path.read_text().splitlines()),
               proc=proc, what=f"epoch {epoch} in metrics.jsonl")


def test_disk_full_while_saving_fails_the_run_and_keeps_the_previous_checkpoint(mlflow_server, tmp_path):
    """torch.save raises ENOSPC on the second epoch's last.pt (a sitecustomize simulates the full disk)."""
    env = faulty_save_env(tmp_path, "f.write(b'partial')\nraise OSError(errno.ENOSPC, 'No space left on device')")
    out = tmp_path / "out"
    result = run_job(tracked(mlflow_server, "diskfull", "train.epochs=3", f"train.out_dir={out}"),
                     env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot write checkpoint {out}/checkpoints/last.pt: No space left on device; "
        "the previous one is intact")
    assert train_state(out / "checkpoints" / "last.pt")["epoch"] == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "last.pt"]  # no temp file left
    assert only_run(mlflow_server.client(), "diskfull").info.status == "FAILED"


def test_progress_lines_and_a_profile_of_every_rank_reach_the_log_the_out_dir_and_mlflow(mlflow_server, two_ranks,
                                                                                      tmp_path):
    out, tmp = two_ranks
    stdout = (tmp / "stdout.txt").read_text()  # a pipe, as under a batch scheduler: no tqdm, progress lines
    lines = re.findall(r"^epoch (\d)/3  step (\d+)/16  loss [\d.]+  acc [\d.]+  \d+ img/s  ETA \d+:\d\d:\d\d$", stdout,
                       re.MULTILINE)
    assert lines == [(str(e), str(s)) for e in (1, 2, 3) for s in (5, 10, 15)]
    for rank in (0, 1):  # profile_ranks=all: each rank's own window
        trace = json.loads((out / "profile" / f"rank{rank}" / "trace.json").read_text())
        names = {event.get("name") for event in trace["traceEvents"]}
        assert {"aten::mean", "aten::sigmoid", "aten::addcmul"} <= names  # the SE block's squeeze, gate and scale
        recorded = {name for name in names if str(name).startswith("ProfilerStep")}
        assert recorded == {f"ProfilerStep#{i}" for i in range(7, 12)}  # after skip 5 and warm-up 2: 5 active
        assert "aten::convolution_backward" in (out / "profile" / f"rank{rank}" / "ops.txt").read_text()
    client = mlflow_server.client()
    run = only_run(client, "two-ranks")
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "profile/rank1")}
    assert logged == {"profile/rank1/trace.json", "profile/rank1/ops.txt"}
