"""CIFAR-10 (or job/synthetic.py's stand-in) as uint8 tensors on the device, sharded and augmented per batch.

Also a command line to pre-stage the data on a machine with internet:
    python -m job.data download --root DIR
"""

import argparse
import contextlib
import functools
import hashlib
import io
import pickle
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data.distributed import DistributedSampler

from job import cli, synthetic
from job.config import DataConfig
from job.distributed import Runtime, raise_together

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"  # torchvision's CIFAR10.base_folder
SPLIT_SEED = 0  # the validation split is fixed, independent of train.seed


def _torchvision_cifar10():
    """torchvision's CIFAR10 class (its file list and md5s) and its file utilities, imported when first needed:
    importing torchvision costs a second per process, which runs on synthetic data never need."""
    from torchvision.datasets import CIFAR10, utils

    return CIFAR10, utils


class DataError(RuntimeError):
    """Data missing, corrupt or failing its checksum; the message is one line with the fix."""


@dataclass
class Splits:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64, all on the training device."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def fingerprint(splits: Splits) -> str:
    """A short hash of every image and label of the three splits: equal only for the same data split the same way
    (source, files, re-encodes, val_size and subsets all show in it). The registry gates on it."""
    digest = hashlib.blake2b(digest_size=8)
    for t in (splits.train_x, splits.train_y, splits.val_x, splits.val_y, splits.test_x, splits.test_y):
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _stage_hint(root: str) -> str:
    return (f"pre-stage it with `python -m job.data download --root {root}` on a machine with internet "
            f"(or set data.download=true)")


def download(root: str, url: str, md5: str) -> None:
    """Fetch and unpack the archive with torchvision's downloader, which checks its md5."""
    # torchvision's progress bar goes to stderr: keep it for a person at a terminal, not for logs
    quiet = contextlib.nullcontext() if sys.stderr.isatty() else contextlib.redirect_stderr(io.StringIO())
    _, utils = _torchvision_cifar10()
    try:
        with quiet:
            utils.download_and_extract_archive(url, root, filename=ARCHIVE, md5=md5)
    except Exception as e:  # urllib, md5 and tar errors alike; the user needs the URL and the reason
        archive = Path(root) / ARCHIVE
        if archive.is_file() and not utils.check_integrity(str(archive), md5):
            reason = f"the archive's md5 {utils.calculate_md5(str(archive))} is not the expected {md5}"
        else:
            reason = cli.first_line(e)
        raise DataError(f"downloading CIFAR-10 from {url} failed: {reason}") from None


def check(root: str, verify: bool, no_verify: str = "set data.verify=false") -> None:
    """Raise DataError unless every standard file is present (and, with verify, has its md5); no_verify is how
    the caller's user turns the md5 check off."""
    cifar10, utils = _torchvision_cifar10()
    folder = Path(root) / FOLDER
    for name, md5 in cifar10.train_list + cifar10.test_list:
        path = folder / name
        if not path.is_file():
            raise DataError(f"CIFAR-10 not found: {path} is missing; {_stage_hint(root)}")
        if verify and not utils.check_integrity(str(path), md5):
            raise DataError(f"CIFAR-10 file {path} fails its md5 check (corrupt or not the original); "
                            f"delete {folder} and download again, or {no_verify} for a re-encoded copy")


def _present(root: str, verify: bool) -> bool:
    try:
        check(root, verify)
        return True
    except DataError:
        return False


# What CIFAR-10's pickled batches refer to: numpy arrays (numpy 1 and 2 module names), and the bytes of a file
# pickled again by Python 3 at protocol 2. Nothing else is looked up, so a batch file cannot name code to run.
BATCH_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                 ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                 ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _ForeignGlobal(pickle.UnpicklingError):
    """A pickled batch that names something besides BATCH_GLOBALS."""


class _BatchUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only BATCH_GLOBALS (data.verify=false reads files no md5 vouches for)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in BATCH_GLOBALS:
            raise _ForeignGlobal(f"it refers to {module[:60]}.{name[:60]}, which a CIFAR-10 batch never does")
        return super().find_class(module, name)


def _read_batches(root: str, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for name in names:
        path = Path(root) / FOLDER / name
        try:
            with open(path, "rb") as f:
                entry = _BatchUnpickler(f, encoding="latin1").load()
            pixels = entry["data"]
            raw_labels = entry.get("labels", entry.get("fine_labels"))
        except _ForeignGlobal as e:
            raise DataError(f"refusing CIFAR-10 file {path}: {cli.first_line(e)} (code, not data); delete it and "
                            f"{_stage_hint(root)}") from None
        except Exception as e:
            raise DataError(f"cannot read CIFAR-10 file {path} (corrupt or truncated: {type(e).__name__}); "
                            f"delete it and {_stage_hint(root)}") from None
        dtype, shape = getattr(pixels, "dtype", type(pixels).__name__), getattr(pixels, "shape", ())
        if str(dtype) != "uint8" or len(shape) != 2 or shape[1] != 3 * 32 * 32:  # a cast would corrupt them silently
            raise DataError(f"CIFAR-10 file {path} holds {dtype} data of shape {tuple(shape)}, not uint8 images "
                            f"(N, 3072); delete it and {_stage_hint(root)}")
        x = torch.as_tensor(pixels).reshape(-1, 3, 32, 32)
        try:
            y = torch.as_tensor(raw_labels, dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError):
            raise DataError(f"CIFAR-10 file {path} holds malformed labels; delete it and {_stage_hint(root)}") from None
        if len(x) != len(y) or len(y) == 0 or int(y.min()) < 0 or int(y.max()) > 9:
            raise DataError(f"CIFAR-10 file {path} holds malformed data; delete it and {_stage_hint(root)}")
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


def read_cifar10(root: str) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((train images, labels), (test images, labels)) from torchvision's on-disk layout."""
    cifar10, _ = _torchvision_cifar10()
    return (_read_batches(root, [n for n, _ in cifar10.train_list]),
            _read_batches(root, [n for n, _ in cifar10.test_list]))


def _prepare_cifar10(cfg: DataConfig, runtime: Runtime) -> None:
    """Local rank 0 of each node downloads (if asked) while the others wait; then every rank checks."""
    error = None
    if cfg.download and runtime.local_rank == 0 and not _present(cfg.root, cfg.verify):
        try:
            download(cfg.root, cfg.url, cfg.md5)
        except DataError as e:
            error = e
    raise_together(error, runtime.device,
                   DataError("CIFAR-10 download failed on another rank (its log has the reason)"))
    check(cfg.root, cfg.verify)


@dataclass
class _Files:
    """A source's training or test files: how many images they hold, and (images, labels) for given indices."""

    n: int
    take: typing.Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _source(cfg: DataConfig, runtime: Runtime) -> tuple[_Files, _Files]:
    """(training files, test files) on the CPU, from data.source; synthetic images are made when taken."""
    if cfg.source == "synthetic":
        return (_Files(synthetic.TRAIN_SIZE, functools.partial(synthetic.make, seed=1)),
                _Files(synthetic.TEST_SIZE, functools.partial(synthetic.make, seed=2)))
    _prepare_cifar10(cfg, runtime)
    return tuple(_Files(len(y), lambda idx, x=x, y=y: (x[idx], y[idx])) for x, y in read_cifar10(cfg.root))


def load_splits(cfg: DataConfig, runtime: Runtime) -> Splits:
    """Train / validation / test splits on the device, following data.* (val split first, then subsets)."""
    train, test = _source(cfg, runtime)
    val_idx, train_idx = split(train.n, cfg)
    parts = (*train.take(train_idx), *train.take(val_idx), *test.take(_subset(test.n, cfg.test_subset)))
    return Splits(*(t.to(runtime.device) for t in parts))


def split(n: int, cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation, training) indices into n training-file images: a fixed random val_size for validation,
    the rest (at most train_subset of it) for training, in file order."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return order[:cfg.val_size], order[cfg.val_size:][:cfg.train_subset].sort().values


def _subset(n: int, size: int | None) -> torch.Tensor:
    """A fixed random `size` of range(n), in order (all of it for None): unbiased where files are sorted by class."""
    if size is None or size >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))[:size].sort().values


def load_test(cfg: DataConfig, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split alone (data.test_subset applies), on the device."""
    _, test = _source(cfg, runtime)
    x, y = test.take(_subset(test.n, cfg.test_subset))
    return x.to(runtime.device), y.to(runtime.device)


def epoch_indices(n: int, seed: int, epoch: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's disjoint share of a permutation that depends only on (seed, epoch).

    DistributedSampler itself (shuffle, drop_last=True), so the semantics are PyTorch's.
    """
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.int64)


def eval_shard(n: int, rank: int, world_size: int) -> slice:
    """A contiguous block of [0, n) per rank; the blocks cover every index exactly once (no padding)."""
    return slice(n * rank // world_size, n * (rank + 1) // world_size)


def step_seed(seed: int, epoch: int, step: int, rank: int, stream: int = 0) -> int:
    """A seed that is a pure function of a step's position (ints hash the same in every process), so resumes
    replay it exactly; stream tells apart the draws of one step (0: crop and flip, 1: MixUp / CutMix)."""
    return hash((seed, epoch, step, rank, stream) if stream else (seed, epoch, step, rank)) & (2**63 - 1)


def step_generator(seed: int, epoch: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The augmentation RNG of one step, on the device."""
    return torch.Generator(device).manual_seed(step_seed(seed, epoch, step, rank))


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Positions outside [0, size) mirrored at the edges without repeating them (F.pad's reflect: -1 -> 1)."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def augment(x: torch.Tensor, g: torch.Generator, cutout: int = 0, *, padding: int = 4, pad_mode: str = "zeros",
            flip: torch.Tensor | None = None) -> torch.Tensor:
    """For a whole uint8 batch: a random 32x32 crop of the image padded by `padding` pixels (zeros or reflect),
    a horizontal flip (random, or where the bool mask flip says), and a cutout square of side `cutout` filled
    with the dataset mean."""
    n, c, h, w = x.shape
    dev = x.device
    out = x
    if padding:
        dy = torch.randint(0, 2 * padding + 1, (n, 1), device=dev, generator=g)
        dx = torch.randint(0, 2 * padding + 1, (n, 1), device=dev, generator=g)
        rows = dy + torch.arange(h, device=dev) - padding  # positions in the unpadded image
        cols = dx + torch.arange(w, device=dev) - padding
        if pad_mode == "reflect":
            source, rows, cols = x, _reflect(rows, h), _reflect(cols, w)
        else:
            source, rows, cols = F.pad(x, (padding,) * 4), rows + padding, cols + padding
        out = source[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                     rows[:, None, :, None], cols[:, None, None, :]]
    if flip is None:
        flip = torch.rand(n, device=dev, generator=g) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(3), out)
    if cutout:  # a cutout x cutout square (clipped at the borders) around a uniformly drawn centre pixel
        cy = torch.randint(0, h, (n, 1, 1, 1), device=dev, generator=g) - cutout // 2
        cx = torch.randint(0, w, (n, 1, 1, 1), device=dev, generator=g) - cutout // 2
        ys = torch.arange(h, device=dev)[None, None, :, None]
        xs = torch.arange(w, device=dev)[None, None, None, :]
        hole = (ys >= cy) & (ys < cy + cutout) & (xs >= cx) & (xs < cx + cutout)
        out = torch.where(hole, _mean_uint8(dev), out)  # the mean: 0 after normalisation, not a -2 sigma black
    return out


def flips(n: int, seed: int, epoch: int, mode: str, device: torch.device) -> torch.Tensor | None:
    """data.flip for every training image in one epoch: None for random (augment draws them per step), a bool mask
    of n for alternate (a fixed random side per image, inverted on odd epochs) and none (all False)."""
    if mode == "random":
        return None
    if mode == "none":
        return torch.zeros(n, dtype=torch.bool, device=device)
    first = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5  # the same in every process
    return (first ^ bool(epoch % 2)).to(device)


@functools.cache
def _mean_uint8(device: torch.device) -> torch.Tensor:
    """The dataset mean as uint8 pixel values (1, 3, 1, 1), made once per device (no host copy per step)."""
    return torch.tensor([round(m * 255) for m in MEAN], dtype=torch.uint8, device=device).view(1, 3, 1, 1)


@functools.cache
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # made once per device: torch.tensor(..., device=cuda) is a blocking copy, a host sync in every step
    return (torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255)


def normalize(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 normalised with the CIFAR-10 mean and std."""
    mean, std = _mean_std(x.device)
    out = x.float().sub_(mean).div_(std)  # in place: one new tensor instead of three, the same bits
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def main(argv: list[str] | None = None) -> int:
    """`python -m job.data download|verify --root DIR`: pre-stage CIFAR-10 where the job will read it."""
    parser = argparse.ArgumentParser(prog="python -m job.data", description=main.__doc__)
    parser.add_argument("command", choices=["download", "verify"])
    parser.add_argument("--root", default=DataConfig.root, help="directory for cifar-10-batches-py/")
    parser.add_argument("--url", default=DataConfig.url, help="archive URL (a mirror, say)")
    parser.add_argument("--md5", default=DataConfig.md5, help="md5 of the archive at --url")
    parser.add_argument("--no-verify", action="store_true", help="skip the md5 check of the unpacked files")
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            download(args.root, args.url, args.md5)
        check(args.root, verify=not args.no_verify, no_verify="pass --no-verify")
        read_cifar10(args.root)
    except DataError as e:
        cli.error(str(e))
        return 1
    print(f"CIFAR-10 ready under {Path(args.root) / FOLDER}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
