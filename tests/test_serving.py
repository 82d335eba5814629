"""Serving and prediction against a real tracking server: `mlflow models serve` of a registered model, its
pickle-free torch.export copy, and `python -m job.predict` on image files (one tiny registered run for all)."""

import json
import re
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from job import predict
from job.data import CLASSES
from job.synthetic import first as synthetic
from job.registry import EXPORTED
from tests.conftest import ROOT, TRACKED, free_port, job_env, kill_tree, run_job, wait_until

pytestmark = pytest.mark.slow  # mlflow models serve and a registered champion (tests/conftest.py SLOW_FIXTURES)

CHAMPION = "models:/serve-dev@champion"
CIFAR_JPEGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-train-jpeg.tar.gz"


@pytest.fixture(scope="module")
def registered(mlflow_server, tmp_path_factory) -> Path:
    """out_dir of one tracked 1-epoch run, whose best.pt is registered as serve-dev version 1 (@champion); this
    process's MLflow client points at the server."""
    import mlflow

    out = tmp_path_factory.mktemp("serve") / "out"
    result = run_job([*TRACKED, f"mlflow.tracking_uri={mlflow_server.uri}",
                      "mlflow.experiment=serve", "mlflow.registered_model=serve", "train.epochs=1",
                      "data.train_subset=256", "data.val_size=64", "data.test_subset=64",
                      f"train.out_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "registry: serve-dev version 1 is @champion" in result.stdout
    mlflow.set_tracking_uri(mlflow_server.uri)
    return out


@pytest.fixture(scope="module")
def champion(registered):
    """The registered champion loaded in this process (the pickle flavour, an nn.Module)."""
    import mlflow

    return mlflow.pytorch.load_model(CHAMPION)


@pytest.fixture(scope="module")
def exported(registered, tmp_path_factory) -> Path:
    """The champion's .pt2, downloaded from the registry as docs/mlflow.md says."""
    import mlflow

    dst = tmp_path_factory.mktemp("exported")
    return Path(mlflow.artifacts.download_artifacts(f"{CHAMPION}/{EXPORTED}", dst_path=str(dst)))


def logits(model, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(images).numpy()


def test_mlflow_models_serve_answers_like_the_registered_model(mlflow_server, champion):
    images, _ = synthetic(5, seed=7)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", CHAMPION, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        env=job_env(MLFLOW_TRACKING_URI=mlflow_server.uri, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_until(answers, timeout=120, proc=server, what="mlflow models serve to answer /ping")
        request = urllib.request.Request(f"{url}/invocations", data=json.dumps({"inputs": images.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            answer = json.loads(r.read())
    finally:
        kill_tree(server.pid)
    served = np.array(answer["predictions"], dtype=np.float32)
    assert served.shape == (5, 10)
    np.testing.assert_allclose(served, logits(champion, images), atol=1e-6)


def test_the_exported_pt2_loads_where_pickle_is_disallowed_and_predicts_like_the_pickle_model(champion, exported,
                                                                                              monkeypatch):
    import mlflow
    from mlflow.exceptions import MlflowException

    images, _ = synthetic(6, seed=11)  # a batch size the export never saw
    expected = logits(champion, images)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with pytest.raises(MlflowException, match="pickle"):  # the setting is in force: the pickle flavour is refused
        mlflow.pytorch.load_model(CHAMPION)
    # the check MLflow itself makes before it loads a pt2 archive with pickle disallowed
    mlflow.pytorch._validate_pt2_archive_is_pickle_free(str(exported))
    np.testing.assert_allclose(logits(torch.export.load(exported).module(), images), expected, atol=1e-5)


LINE = re.compile(r"\S+(  [a-z]+ [01]\.\d{3})+")  # path, then "  class probability" pairs


def parse(stdout: str) -> dict[str, list[tuple[str, float]]]:
    """job.predict's lines as {path: [(class, probability), ...]}, each line checked for its format."""
    lines = {}
    for line in stdout.splitlines():
        assert LINE.fullmatch(line), line
        path, *pairs = line.split("  ")
        lines[path] = [(name, float(p)) for name, p in (pair.split(" ") for pair in pairs)]
    return lines


def check_ranked(ranked: list[tuple[str, float]], k: int) -> None:
    names, probabilities = [n for n, _ in ranked], [p for _, p in ranked]
    assert len(ranked) == k and set(names) <= set(CLASSES) and len(set(names)) == k
    assert probabilities == sorted(probabilities, reverse=True)


def odd_images(directory: Path) -> list[str]:
    """A JPEG, a grayscale PNG and an RGBA PNG, none of them 32x32."""
    rng = np.random.default_rng(0)
    files = {"wide.jpg": Image.fromarray(rng.integers(0, 256, (60, 100, 3), dtype=np.uint8)),
             "gray.png": Image.fromarray(rng.integers(0, 256, (45, 77), dtype=np.uint8)),
             "rgba.png": Image.fromarray(rng.integers(0, 256, (33, 31, 4), dtype=np.uint8), "RGBA")}
    for name, image in files.items():
        image.save(directory / name)
    return [str(directory / name) for name in files]


def test_predict_from_a_checkpoint_the_export_and_the_registry_prints_the_same_lines(registered, exported,
                                                                                    mlflow_server, monkeypatch,
                                                                                    tmp_path, capsys):
    images = odd_images(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    printed = []
    for model in (str(registered / "checkpoints" / "best.pt"), str(exported), CHAMPION):
        assert predict.main(["--model", model, "--top-k", "10", *images]) == 0
        out, err = capsys.readouterr()
        assert err == ""
        printed.append(out)
    assert printed[0] == printed[1] == printed[2]
    lines = parse(printed[0])
    assert list(lines) == images
    for ranked in lines.values():
        check_ranked(ranked, 10)
        assert sum(p for _, p in ranked) == pytest.approx(1, abs=0.006)  # ten figures rounded to 3 decimals


def test_predict_with_the_export_where_mlflow_is_not_installed_reports_each_bad_file_and_classifies_the_rest(
        mlflow_server, exported, monkeypatch, tmp_path, capsys):
    """As a user runs it, with no mlflow to import: the top 3 by default, the registered model's answers, an error
    line per unreadable file, exit 1."""
    good = odd_images(tmp_path)
    (tmp_path / "notes.png").write_text("not an image")
    bad = [str(tmp_path / "notes.png"), str(tmp_path / "missing.jpg")]
    argv = ["job.predict", "--model", str(exported), good[0], *bad, *good[1:]]
    result = subprocess.run([sys.executable, "-c", (
        "import runpy, sys\n"
        "sys.modules['mlflow'] = None  # `import mlflow` fails, as if not installed\n"
        f"sys.argv = {argv!r}\n"
        "runpy.run_module('job.predict', run_name='__main__')\n")],
        cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: cannot read image {bad[0]}: not a PNG, JPEG or other image "
                                          f"format PIL reads",
                                          f"error: cannot read image {bad[1]}: No such file or directory"]
    lines = parse(result.stdout)
    assert list(lines) == good
    for ranked in lines.values():
        check_ranked(ranked, 3)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    assert predict.main(["--model", CHAMPION, *good]) == 0
    assert capsys.readouterr().out == result.stdout


@pytest.mark.parametrize("model, message", [
    ("models:/serve-dev@nobody", "cannot load model models:/serve-dev@nobody: INVALID_PARAMETER_VALUE: Registered model "
                                "alias nobody not found"),
    ("models:/no-such-model/1", "cannot load model models:/no-such-model/1: RESOURCE_DOES_NOT_EXIST: "),
    ("missing.pt2", "exported model not found: missing.pt2"),
    ("missing.pt", "checkpoint not found: missing.pt"),
])
def test_predict_refuses_a_model_it_cannot_load_in_one_line(mlflow_server, registered, model, message, monkeypatch,
                                                           tmp_path, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    assert predict.main(["--model", model, *odd_images(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: {message}") and err.count("\n") == 1, err


@pytest.mark.skipif(not CIFAR_JPEGS.is_file(), reason=f"{CIFAR_JPEGS} is absent (../shared is not beside the repo)")
def test_predict_on_real_cifar10_jpegs(registered, tmp_path, capsys):
    """One JPEG of each class from the real (re-encoded) training images; a 1-epoch model on synthetic data is
    not expected to be right, only to answer in CIFAR-10's classes."""
    files = {}
    with tarfile.open(CIFAR_JPEGS) as archive:
        for member in archive:  # train/<class>/<n>.jpg
            label = Path(member.name).parent.name
            if member.isfile() and member.name.endswith(".jpg") and label not in files:
                files[label] = str(tmp_path / f"{label}.jpg")
                Path(files[label]).write_bytes(archive.extractfile(member).read())
    assert sorted(files) == sorted(CLASSES)
    assert predict.main(["--model", str(registered / "checkpoints" / "best.pt"), *files.values()]) == 0
    lines = parse(capsys.readouterr().out)
    assert list(lines) == list(files.values())
    for ranked in lines.values():
        check_ranked(ranked, 3)
