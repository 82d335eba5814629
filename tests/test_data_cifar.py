"""CIFAR-10 on disk, end to end: reading, checking, downloading (from a local HTTP server) and training.

The files come from tests/fakecifar.py, which writes the real on-disk format (Python 2 pickles in
cifar-10-batches-py/, packed as cifar-10-python.tar.gz) with a few hundred learnable images.
"""

import functools
import hashlib
import http.server
import os
import pickle
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
from torchvision.datasets.utils import extract_archive

from job import data, records
from job.data import DataError

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fakecifar  # noqa: E402
from tests.conftest import job_env, run_job  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
N_PER_BATCH, N_TEST = 100, 100  # 500 training images, 100 test images
TINY = ["mlflow.enabled=false", "model.width=8", "train.device=cpu", "train.epochs=1", "train.batch_size=50",
        "data.val_size=100", "data.test_subset=100", "train.eval_batch_size=100"]
TIMEOUT = 180


def _env() -> dict[str, str]:
    """The job's test environment, with the local download server reached directly, never through a proxy."""
    env = {k: v for k, v in job_env().items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    return {**env, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def run_module(module: str, *args: str, nproc: int = 0) -> subprocess.CompletedProcess:
    """`python -m module args...` (or under a real torchrun with nproc ranks) from the repository root, output
    captured."""
    return run_job(list(args), nproc=nproc, env=_env(), module=module, timeout=TIMEOUT,
                   torchrun=() if nproc else None)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def metrics(out_dir: Path) -> list[dict]:
    return records.read_lines(records.metrics_path(out_dir))


@pytest.fixture
def fake(tmp_path):
    """CIFAR-10 files under tmp_path/cifar; returns (root, what was written)."""
    root = tmp_path / "cifar"
    return root, fakecifar.make_cifar10(root, N_PER_BATCH, N_TEST, seed=0)


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list  # set per server

    def do_GET(self):
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client that hangs up early is not a test failure
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 (free port) serving tmp_path/www, which holds the fake archive at
    /cifar-10-python.tar.gz and a copy with flipped bytes at /corrupt/cifar-10-python.tar.gz."""
    www = tmp_path / "www"
    (www / "corrupt").mkdir(parents=True)
    path, md5 = fakecifar.make_archive(www, N_PER_BATCH, N_TEST, seed=0)
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) // 3, len(raw) // 3 + 64):
        raw[i] ^= 0xFF
    (www / "corrupt" / fakecifar.ARCHIVE).write_bytes(bytes(raw))
    handler = type("Handler", (_Handler,), {"requests": []})
    httpd = _Server(("127.0.0.1", 0), functools.partial(handler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield {"url": f"{base}/{fakecifar.ARCHIVE}", "corrupt_url": f"{base}/corrupt/{fakecifar.ARCHIVE}",
               "md5": md5, "requests": handler.requests}
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


# --- the fake files are in the real format ----------------------------------------------------------------


def test_fake_batches_are_python2_pickles_like_the_real_files(fake):
    root, written = fake
    folder = root / fakecifar.FOLDER
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [n for n, _ in tv_cifar.CIFAR10.train_list + tv_cifar.CIFAR10.test_list]
        + [tv_cifar.CIFAR10.meta["filename"], "readme.html"])
    with open(folder / "data_batch_1", "rb") as f:
        raw = f.read()
    assert raw[:2] == b"\x80\x02"  # protocol 2, as cPickle wrote them
    as_str = pickle.loads(raw, encoding="latin1")  # how torchvision and job.data read them
    assert list(as_str) == ["batch_label", "labels", "data", "filenames"]
    assert as_str["batch_label"] == "training batch 1 of 5"
    assert as_str["data"].dtype == np.uint8 and as_str["data"].shape == (N_PER_BATCH, 3072)
    assert as_str["labels"] == written["train_y"][:N_PER_BATCH].tolist()
    as_bytes = pickle.loads(raw, encoding="bytes")  # the real files' keys are Python 2 str, i.e. bytes
    assert list(as_bytes) == [b"batch_label", b"labels", b"data", b"filenames"]
    np.testing.assert_array_equal(as_bytes[b"data"], written["train_x"][:N_PER_BATCH])
    with open(folder / "batches.meta", "rb") as f:
        meta = pickle.load(f, encoding="latin1")
    assert meta == {"num_cases_per_batch": N_PER_BATCH, "label_names": list(data.CLASSES), "num_vis": 3072}


def test_torchvision_reads_the_fake_files(fake, monkeypatch):
    root, written = fake
    # The only thing torchvision would object to is the md5 of every file (these are not the originals).
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    train = tv_cifar.CIFAR10(str(root), train=True, download=False)
    test = tv_cifar.CIFAR10(str(root), train=False, download=False)
    np.testing.assert_array_equal(train.data, written["train_hwc"])  # torchvision converts to HWC itself
    np.testing.assert_array_equal(test.data, written["test_hwc"])
    assert train.targets == written["train_y"].tolist() and test.targets == written["test_y"].tolist()
    assert train.classes == list(data.CLASSES)


def test_archive_unpacks_to_the_same_files(tmp_path):
    path, md5 = fakecifar.make_archive(tmp_path / "a", N_PER_BATCH, N_TEST, seed=3)
    assert path.name == "cifar-10-python.tar.gz"
    assert md5 == hashlib.md5(path.read_bytes()).hexdigest()
    assert fakecifar.make_archive(tmp_path / "b", N_PER_BATCH, N_TEST, seed=3)[1] == md5  # reproducible
    assert sorted(os.listdir(tmp_path / "a")) == ["cifar-10-python.tar.gz"]  # no staging left behind
    with tarfile.open(path) as tar:
        names = tar.getnames()
    assert names == ["cifar-10-batches-py"] + [f"cifar-10-batches-py/{n}" for n in fakecifar.ARCHIVE_ORDER]
    extract_archive(str(path), str(tmp_path / "x"))
    written = fakecifar.make_cifar10(tmp_path / "direct", N_PER_BATCH, N_TEST, seed=3)
    unpacked = {p.name: hashlib.md5(p.read_bytes()).hexdigest()
                for p in (tmp_path / "x" / fakecifar.FOLDER).iterdir()}
    assert unpacked == written["md5"]


# --- job.data reads and checks them ---------------------------------------------------------------------


def test_read_cifar10_gives_exact_pixels_and_labels(fake):
    root, written = fake
    (train_x, train_y), (test_x, test_y) = data.read_cifar10(str(root))
    assert train_x.shape == (5 * N_PER_BATCH, 3, 32, 32) and train_x.dtype == torch.uint8
    assert train_y.shape == (5 * N_PER_BATCH,) and train_y.dtype == torch.int64
    assert test_x.shape == (N_TEST, 3, 32, 32) and test_x.dtype == torch.uint8
    assert test_y.shape == (N_TEST,) and test_y.dtype == torch.int64
    # Batches are concatenated in order data_batch_1..5: image i of batch k is row k * N + i.
    assert torch.equal(train_x, torch.from_numpy(written["train_hwc"]).permute(0, 3, 1, 2))
    assert torch.equal(test_x, torch.from_numpy(written["test_hwc"]).permute(0, 3, 1, 2))
    assert train_y.tolist() == written["train_y"].tolist() and test_y.tolist() == written["test_y"].tolist()
    for i in (0, 1, N_PER_BATCH + 7, 5 * N_PER_BATCH - 1):
        row, hwc = written["train_x"][i], written["train_hwc"][i]
        # The stored row: first 1024 bytes the red plane, then green, then blue, each row-major.
        for c in range(3):
            np.testing.assert_array_equal(row[1024 * c:1024 * (c + 1)], hwc[:, :, c].reshape(-1))
            assert torch.equal(train_x[i, c], torch.from_numpy(hwc[:, :, c]))
        assert int(train_x[i, 0, 3, 17]) == int(row[3 * 32 + 17]) == int(hwc[3, 17, 0])
        assert int(train_x[i, 2, 31, 0]) == int(row[2048 + 31 * 32]) == int(hwc[31, 0, 2])
        # And it is red in the sense of the picture: the plane's mean is near the class colour's red.
        colour = fakecifar.PALETTE[written["train_y"][i]]
        assert np.abs(train_x[i].float().mean((1, 2)).numpy() - colour).max() < 25


def test_check_verify_rejects_files_that_are_not_the_originals(fake):
    root, _ = fake
    with pytest.raises(DataError, match="md5") as info:
        data.check(str(root), verify=True)
    assert "\n" not in str(info.value) and "data.verify=false" in str(info.value)
    data.check(str(root), verify=False)


def test_check_missing_file_says_how_to_stage(fake):
    root, _ = fake
    missing = root / fakecifar.FOLDER / "data_batch_4"
    missing.unlink()
    with pytest.raises(DataError) as info:
        data.check(str(root), verify=False)
    message = str(info.value)
    assert "\n" not in message and str(missing) in message
    assert f"python -m job.data download --root {root}" in message
    for name in os.listdir(root / fakecifar.FOLDER):  # with verify, nothing there at all: still the hint
        (root / fakecifar.FOLDER / name).unlink()
    with pytest.raises(DataError, match="python -m job.data download --root") as info:
        data.check(str(root), verify=True)
    assert "\n" not in str(info.value) and "data_batch_1 is missing" in str(info.value)


def test_truncated_batch_is_a_one_line_data_error(fake, capsys):
    root, _ = fake
    path = root / fakecifar.FOLDER / "data_batch_3"
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    data.check(str(root), verify=False)  # presence alone does not notice
    with pytest.raises(DataError) as info:
        data.read_cifar10(str(root))
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "truncated" in message
    # `python -m job.data verify --no-verify` reads the files too, so it does notice.
    assert data.main(["verify", "--root", str(root), "--no-verify"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(path) in err


def test_float_pixels_are_refused_not_cast_and_verify_names_its_own_flag(fake, capsys):
    """A batch whose data is float (a user's own export) was cast to 0/1 pixels and called ready."""
    root, _ = fake
    path = root / fakecifar.FOLDER / "data_batch_2"
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    entry["data"] = entry["data"].astype("float32") / 255
    path.write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(DataError) as info:
        data.read_cifar10(str(root))
    assert str(info.value) == (f"CIFAR-10 file {path} holds float32 data of shape ({len(entry['data'])}, 3072), "
                               f"not uint8 images (N, 3072); delete it and pre-stage it with `python -m job.data "
                               f"download --root {root}` on a machine with internet (or set data.download=true)")
    assert data.main(["verify", "--root", str(root)]) == 1  # md5 first: the hint is the command's own flag
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --no-verify for a re-encoded copy" in err and "data.verify" not in err


# --- python -m job.data download ------------------------------------------------------------------------


def test_cli_download(server, tmp_path, capsys):
    root = tmp_path / "dl"
    result = run_module("job.data", "download", "--root", str(root), "--url", server["url"], "--md5", server["md5"],
                        "--no-verify")
    assert result.returncode == 0, result.stderr
    assert "CIFAR-10 ready" in result.stdout
    data.check(str(root), verify=False)
    (train_x, _), (test_x, _) = data.read_cifar10(str(root))
    assert len(train_x) == 5 * N_PER_BATCH and len(test_x) == N_TEST
    # Without --no-verify the (non-original) files fail the per-file md5, with one error line.
    assert data.main(["verify", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "md5" in err


@pytest.mark.parametrize("case", ["corrupt archive, original md5", "good archive, wrong md5"])
def test_cli_download_rejects_a_bad_archive(server, tmp_path, case):
    url, md5 = server["url"], server["md5"]
    if case.startswith("corrupt"):
        url = server["corrupt_url"]
    else:
        md5 = hashlib.md5(b"something else").hexdigest()
    root = tmp_path / "dl"
    result = run_module("job.data", "download", "--root", str(root), "--url", url, "--md5", md5, "--no-verify")
    assert result.returncode != 0
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and url in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (root / fakecifar.FOLDER).exists()  # nothing unpacked from an archive that failed its md5


def test_cli_download_failure_stderr_is_exactly_one_line(server, tmp_path, capsys):
    # In process (sys.stderr is captured, not a terminal), the same code path as the subprocess above.
    code = data.main(["download", "--root", str(tmp_path / "dl"), "--url", server["corrupt_url"],
                      "--md5", server["md5"], "--no-verify"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error:"), repr(err)
    assert "md5" in err and server["md5"] in err  # says which checksum failed


def test_download_archive_that_passes_md5_but_is_truncated(server, tmp_path):
    """A mirror serving a truncated archive together with its own md5: the unpacking fails, one line."""
    bad = tmp_path / "www" / "truncated" / fakecifar.ARCHIVE
    bad.parent.mkdir()
    good = (tmp_path / "www" / fakecifar.ARCHIVE).read_bytes()
    bad.write_bytes(good[:len(good) // 2])
    url = server["url"].rsplit("/", 1)[0] + "/truncated/" + fakecifar.ARCHIVE
    with pytest.raises(DataError) as info:
        data.download(str(tmp_path / "dl"), url, hashlib.md5(bad.read_bytes()).hexdigest())
    assert url in str(info.value) and "\n" not in str(info.value)


# --- the training job ----------------------------------------------------------------------------------


def test_train_downloads_then_trains(server, tmp_path):
    out = tmp_path / "run"
    result = run_module("job.train", "data.download=true", f"data.url={server['url']}", f"data.md5={server['md5']}",
                        "data.verify=false", f"data.root={tmp_path / 'dl'}", f"train.out_dir={out}", *TINY)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "dl" / fakecifar.FOLDER / "data_batch_5").is_file()
    final = metrics(out)[-1]
    assert "test_acc" in final and final["test_images"] == N_TEST
    assert (out / "checkpoints" / "best.pt").is_file()


def test_train_learns_the_fake_cifar(fake, tmp_path):
    """The fake images are learnable: three short epochs of a width-8 SENet are far above chance (0.1)."""
    root, _ = fake
    out = tmp_path / "run"
    result = run_module("job.train", "data.verify=false", f"data.root={root}", f"train.out_dir={out}", *TINY,
                        "train.epochs=3", "train.warmup_epochs=0", "train.lr=0.05", "train.ref_batch_size=50")
    assert result.returncode == 0, result.stderr
    assert metrics(out)[-1]["test_acc"] >= 0.4


def test_train_without_data_fails_cleanly(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"epoch": 0, "val_acc": 0.5}\n')
    root = tmp_path / "no-data"
    result = run_module("job.train", "data.source=cifar10", "data.download=false", f"data.root={root}",
                        f"train.out_dir={out}", *TINY)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error:"), repr(result.stderr)
    assert f"python -m job.data download --root {root}" in result.stderr
    assert list((out / "checkpoints").iterdir()) == []  # nothing written where checkpoints live
    assert (out / "metrics.jsonl").read_text() == '{"epoch": 0, "val_acc": 0.5}\n'  # nor metrics truncated
    assert not root.exists()
    # found before torchrun by the pods' and sbatch's first command: exit 2, which fails a Job at once
    checked = run_module("job.train", "--check", "data.source=cifar10", "data.download=false", f"data.root={root}",
                         f"train.out_dir={out}", *TINY)
    assert checked.returncode == 2 and checked.stderr == result.stderr


@pytest.mark.slow
def test_torchrun_two_ranks_download_once_and_train(server, tmp_path):
    # How many requests one download makes (torchvision probes the URL for redirects first).
    data.download(str(tmp_path / "probe"), server["url"], server["md5"])
    per_download = len(server["requests"])
    server["requests"].clear()
    out = tmp_path / "run"
    result = run_module("job.train", "data.download=true", f"data.url={server['url']}",
                        f"data.md5={server['md5']}", "data.verify=false", f"data.root={tmp_path / 'dl'}",
                        f"train.out_dir={out}", "train.timeout_s=120", *TINY,
                        nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]  # torchrun: every rank exited 0
    assert "world_size 2" in result.stdout
    assert len(server["requests"]) == per_download  # local rank 0 alone downloaded
    final = metrics(out)[-1]
    assert final["test_images"] == N_TEST  # both ranks' test shards were counted
    assert (out / "checkpoints" / "best.pt").is_file()
