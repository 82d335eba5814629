"""Results as statistics: finished runs of an experiment grouped by recipe (the config without the seed).

    python -m job.report [--experiment NAME] [--tracking-uri URI] [--format text|json] [--plot FILE.png]

Per recipe: finished runs, test accuracy mean ± sample std, min and max, best validation accuracy (mean),
the median epoch time, and the settings in which the listed recipes differ. --plot draws each recipe's
validation accuracy per epoch (mean over its runs, min-max band).
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from job import cli, provenance
from job.config import MlflowConfig


def recipe_of(params: dict[str, str]) -> tuple[str, dict[str, str]]:
    """(hash, settings) of a run's logged config as a recipe: without the seed, the outputs and MLflow's settings."""
    settings = provenance.recipe(params, seed=False)
    return provenance.digest(settings), settings


def summarize(runs: list[dict]) -> list[dict]:
    """One row per recipe from [{'params', 'test_acc', 'best_val_acc', 'epoch_time_s'}]; best mean first."""
    groups: dict[str, list[dict]] = {}
    settings: dict[str, dict[str, str]] = {}
    for run in runs:
        key, settings[key] = recipe_of(run["params"])
        groups.setdefault(key, []).append(run)
    differing = sorted({k for s in settings.values() for k in s
                        if len({other.get(k) for other in settings.values()}) > 1})
    rows = []
    for key, members in groups.items():
        acc = [r["test_acc"] for r in members]
        val = [r["best_val_acc"] for r in members if r.get("best_val_acc") is not None]
        times = [r["epoch_time_s"] for r in members if r.get("epoch_time_s") is not None]
        rows.append({"recipe": key, "runs": len(members), "test_acc_mean": statistics.fmean(acc),
                     "test_acc_std": statistics.stdev(acc) if len(acc) > 1 else None,
                     "test_acc_min": min(acc), "test_acc_max": max(acc),
                     "best_val_acc_mean": statistics.fmean(val) if val else None,
                     "epoch_time_s_median": statistics.median(times) if times else None,
                     "seeds": sorted(int(r["params"].get("train.seed", 0)) for r in members),
                     "val_acc_curves": [r.get("val_acc_curve", []) for r in members],
                     "differs_in": {k: settings[key].get(k) for k in differing}})
    return sorted(rows, key=lambda r: -r["test_acc_mean"])


def fetch(tracking_uri: str, experiment: str) -> list[dict]:
    """Every FINISHED run of the experiment that logged test_acc, with its params and summary metrics."""
    import mlflow

    from job.mlflow_env import fail_fast, tracking_uri as resolve

    fail_fast()
    uri = resolve(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise FileNotFoundError(f"no MLflow store at {uri} (run from the directory of the runs, or --tracking-uri)")
    client = mlflow.MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise LookupError(f"no experiment named {experiment!r} at {uri}")
    runs, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'", max_results=1000,
                                  page_token=token)
        for run in page:
            metrics = run.data.metrics
            if "test_acc" not in metrics:
                continue
            times = [m.value for m in client.get_metric_history(run.info.run_id, "epoch_time_s")]
            val = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_acc"))
            runs.append({"params": run.data.params, "test_acc": metrics["test_acc"],
                         "best_val_acc": metrics.get("best_val_acc"),
                         "epoch_time_s": statistics.median(times) if times else None,
                         "val_acc_curve": [v for _, v in val]})
        token = page.token
        if not token:
            return runs


def plot(rows: list[dict], path: Path) -> Path:
    """Each recipe's validation accuracy per epoch: the mean over its runs, and a min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for r in rows:
        curves = [c for c in r["val_acc_curves"] if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        columns = list(zip(*(c[:n] for c in curves)))
        epochs = range(1, n + 1)
        label = " ".join(f"{k.split('.')[-1]}={v}" for k, v in r["differs_in"].items()) or r["recipe"]
        line, = ax.plot(epochs, [statistics.fmean(col) for col in columns],
                        label=f"{label} (n={len(curves)}, test {r['test_acc_mean']:.3f})")
        ax.fill_between(epochs, [min(col) for col in columns], [max(col) for col in columns],
                        color=line.get_color(), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict]) -> str:
    """The rows as a fixed-width text table."""
    lines = [f"{'recipe':<12}  {'runs':>4}  {'test_acc mean ± std':<20}  {'min':>6}  {'max':>6}  {'best_val':>8}  "
             f"{'epoch_s':>7}  settings that differ"]
    for r in rows:
        spread = f"{_number(r['test_acc_mean'])} ± {_number(r['test_acc_std'])}"
        differs = " ".join(f"{k}={v}" for k, v in r["differs_in"].items())
        lines.append(f"{r['recipe']:<12}  {r['runs']:>4}  {spread:<20}  {_number(r['test_acc_min'])}  "
                     f"{_number(r['test_acc_max'])}  {_number(r['best_val_acc_mean']):>8}  "
                     f"{_number(r['epoch_time_s_median'], 1):>7}  {differs}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m job.report", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=MlflowConfig.experiment, help="MLflow experiment name")
    parser.add_argument("--tracking-uri", default="",
                        help="default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db (as job.train)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="also draw the validation curves per recipe")
    args = parser.parse_args(argv)
    try:
        rows = summarize(fetch(args.tracking_uri, args.experiment))
    except Exception as e:  # an absent server, a missing experiment: one line either way
        cli.error(f"cannot read experiment {args.experiment!r}: {cli.first_line(e)}")
        return 1
    if args.plot and rows:
        try:
            plot(rows, args.plot)
        except OSError as e:
            cli.error(f"cannot write {args.plot}: {e.strerror or e}")
            return 1
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no finished runs with a test accuracy in experiment {args.experiment!r}")
    else:
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
