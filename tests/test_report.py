"""python -m job.report: finished runs grouped by recipe (the config without the seed), as mean ± std."""

import json
import statistics

import pytest

from job.report import recipe_of, summarize, table
from tests.conftest import run_job


def run(seed: int, acc: float, **params: str) -> dict:
    base = {"train.seed": str(seed), "train.out_dir": f"runs/s{seed}", "model.width": "32", "train.epochs": "15",
            "mlflow.run_name": f"seed{seed}"}
    return {"params": {**base, **params}, "test_acc": acc, "best_val_acc": acc + 0.01, "epoch_time_s": 10.0 + seed}


def test_seeds_outputs_and_mlflow_settings_do_not_make_another_recipe():
    assert recipe_of(run(0, 0.9)["params"])[0] == recipe_of(run(7, 0.8)["params"])[0]
    assert recipe_of(run(0, 0.9)["params"])[0] != recipe_of(run(0, 0.9, **{"train.epochs": "30"})["params"])[0]


def test_one_row_per_recipe_with_mean_std_min_max_best_first():
    runs = [run(0, 0.90), run(1, 0.92), run(2, 0.91), run(0, 0.95, **{"train.epochs": "30"}),
            run(1, 0.97, **{"train.epochs": "30"})]
    rows = summarize(runs)
    assert [r["runs"] for r in rows] == [2, 3]
    long, short = rows
    assert long["differs_in"] == {"train.epochs": "30"} and short["differs_in"] == {"train.epochs": "15"}
    assert short["test_acc_mean"] == pytest.approx(0.91)
    assert short["test_acc_std"] == pytest.approx(statistics.stdev([0.90, 0.92, 0.91]))
    assert (short["test_acc_min"], short["test_acc_max"]) == (0.90, 0.92)
    assert short["best_val_acc_mean"] == pytest.approx(0.92) and short["epoch_time_s_median"] == 11.0
    assert short["seeds"] == [0, 1, 2]


def test_a_single_run_has_no_spread():
    (row,) = summarize([run(0, 0.9)])
    assert row["test_acc_std"] is None and row["differs_in"] == {}


def test_table_has_one_line_per_recipe():
    lines = table(summarize([run(0, 0.90), run(1, 0.92), run(0, 0.95, **{"train.epochs": "30"})])).splitlines()
    assert lines[0].startswith("recipe") and len(lines) == 3
    assert lines[1].split()[1:5] == ["1", "0.9500", "±", "-"] and lines[1].endswith("train.epochs=30")
    assert lines[2].split()[1:5] == ["2", "0.9100", "±", "0.0141"]


def test_report_reads_a_real_store_end_to_end(tmp_path):
    """Runs logged as job.train logs them (params, per-epoch metrics, test_acc), into a real sqlite store; the
    live Slurm array test (test_slurm.py) reports on runs that the job itself logged."""
    import mlflow

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store)
    experiment = client.create_experiment("seeds", artifact_location=str(tmp_path / "artifacts"))
    for seed, acc in ((0, 0.90), (1, 0.92)):
        run_id = client.create_run(experiment).info.run_id
        for key, value in run(seed, acc)["params"].items():
            client.log_param(run_id, key, value)
        for epoch, val in enumerate((0.5, 0.8, acc)):
            client.log_metric(run_id, "val_acc", val, step=epoch)
            client.log_metric(run_id, "epoch_time_s", 10.0 + epoch, step=epoch)
        client.log_metric(run_id, "test_acc", acc)
        client.set_terminated(run_id, "FINISHED")
    unfinished = client.create_run(experiment).info.run_id  # still RUNNING: not counted
    client.log_metric(unfinished, "test_acc", 0.1)

    png = tmp_path / "curves.png"
    result = run_job(["--experiment", "seeds", "--tracking-uri", store, "--format", "json", "--plot", str(png)],
                     module="job.report")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert row["runs"] == 2 and row["seeds"] == [0, 1] and row["test_acc_mean"] == pytest.approx(0.91)
    assert row["epoch_time_s_median"] == 11.0 and sorted(row["val_acc_curves"]) == [[0.5, 0.8, 0.9], [0.5, 0.8, 0.92]]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    missing = run_job(["--experiment", "nope", "--tracking-uri", store], module="job.report")
    assert missing.returncode == 1 and missing.stderr.strip() == (
        f"error: cannot read experiment 'nope': no experiment named 'nope' at {store}")
