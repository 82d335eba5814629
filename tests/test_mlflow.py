"""MLflow against a real tracking server on 127.0.0.1: one run per job, resumes, the registry gate, outages."""

import json
import os
import subprocess

import pytest
import torch

from tests.conftest import (ROOT, TINY, MlflowServer, faulty_save_env, free_port, job_env, kill_tree, read_metrics, run_job,
                            start_job, train_state, wait_until)

TRACKED = [a for a in TINY if not a.startswith("mlflow.")]


def tracked(server, name: str, *extra: str) -> list[str]:
    return [*TRACKED, f"mlflow.tracking_uri={server.uri}", f"mlflow.experiment={name}",
            f"mlflow.registered_model={name}", *extra]


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
    result = run_job(tracked(mlflow_server, "two-ranks", "train.epochs=3", f"train.out_dir={out}"), nproc=2,
                     env=probe_env(tmp))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "registry: two-ranks version 1 is @champion: there was no champion" in result.stdout
    return out, tmp


def test_two_ranks_log_one_run_from_rank_zero_only(mlflow_server, two_ranks, tmp_path):
    out, probes = two_ranks
    assert (probes / "rank-0").read_text() == "True" and (probes / "rank-1").read_text() == "False"

    client = mlflow_server.client()
    run = only_run(client, "two-ranks")
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.epochs"] == "3" and params["model.width"] == "8" and params["data.source"] == "synthetic"
    assert params["train.batch_size"] == "64" and "mlflow.tracking_uri" in params
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
    version = client.get_model_version("two-ranks", "1")
    assert version.run_id == run.info.run_id
    assert float(version.tags["val_acc"]) == read_metrics(out)[-1]["best_val_acc"]
    assert version.tags["run_id"] == run.info.run_id and version.tags["config_hash"] == tags["config_hash"]
    assert float(version.tags["test_acc"]) == run.data.metrics["test_acc"]


def test_registered_champion_predicts_like_the_checkpoint(mlflow_server, two_ranks):
    import mlflow

    from job.data import normalize, synthetic
    from senet import FlipAverage, senet18

    out, _ = two_ranks
    mlflow.set_tracking_uri(mlflow_server.uri)
    served = mlflow.pytorch.load_model("models:/two-ranks/1")
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
    cli = run_job(["--model", "models:/two-ranks/1", f"mlflow.tracking_uri={mlflow_server.uri}",
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
    assert line.startswith("registry: two-ranks version 2 is @challenger: val_acc ")
    assert "does not beat @champion version 1" in line
    client = mlflow_server.client()
    assert client.get_model_version_by_alias("two-ranks", "champion").version == "1"
    assert client.get_model_version_by_alias("two-ranks", "challenger").version == "2"


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

    result = run_job(args, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(client, "resumed")
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
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


def test_a_password_in_the_uri_is_refused(tmp_path):
    uri = "http://alice:s3cret@127.0.0.1:5000"
    result = run_job([*TRACKED, f"mlflow.tracking_uri={uri}", f"train.out_dir={tmp_path}"])
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: mlflow.tracking_uri http://alice:***@127.0.0.1:5000 holds a password: "
                                     "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                                     "MLFLOW_TRACKING_TOKEN) in the environment instead")
    env = job_env(MLFLOW_TRACKING_URI=uri)  # the same from the environment
    result = run_job([*TINY[:-1], f"train.out_dir={tmp_path}"], env=env)
    assert result.returncode == 1 and "s3cret" not in result.stderr + result.stdout
    assert "error: MLflow tracking URI http://alice:***@127.0.0.1:5000 holds a password" in result.stderr


def test_server_gone_mid_run_loses_nothing(tmp_path):
    server = MlflowServer(tmp_path / "mlflow").start() if (tmp_path / "mlflow").mkdir() is None else None
    out = tmp_path / "out"
    args = [*TRACKED, f"mlflow.tracking_uri={server.uri}", "mlflow.experiment=outage", "train.epochs=6",
            "mlflow.registered_model=outage", "mlflow.flush_timeout_s=180", f"train.out_dir={out}"]
    proc = start_job(args)
    try:
        wait_for_epoch(out, 0, proc)
        server.stop()
        wait_for_epoch(out, 2, proc)  # epochs 1 and 2 run while the server is away
        server.start()
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        assert stderr.count("warning: MLflow unreachable") == 1
        client = server.client()
        run = only_run(client, "outage")
        assert run.info.status == "FINISHED"
        for key in ("train_loss", "val_acc", "epoch_time_s"):
            assert steps(client, run.info.run_id, key) == [0, 1, 2, 3, 4, 5], key
        assert "test_acc" in run.data.metrics
    finally:
        kill_tree(proc.pid)
        server.stop()


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
