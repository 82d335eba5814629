"""The synthetic source (data.source=synthetic): a generated, learnable stand-in for CIFAR-10 of the same shapes,
for runs without the files. Each class is a smooth colour pattern, each image that pattern plus noise in 2x2
grains."""

import functools

import torch
import torch.nn.functional as F

TRAIN_SIZE, TEST_SIZE = 50000, 10000  # images in the "training" and "test files", as in CIFAR-10's

_M32 = 0xFFFFFFFF
_NOISE_CELLS = 3 * 16 * 16  # one noise value per channel and 2x2 grain cell
_CHUNK = 4096  # images generated at once: bounded memory for any n


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of int64 values in [0, 2**32) (xorshift-multiply rounds; multipliers below 2**31
    keep every int64 product exact)."""
    for m in (0x7FEB352D, 0x5BD1E995):
        x = ((x ^ (x >> 16)) * m) & _M32
    return x ^ (x >> 16)


@functools.cache
def _patterns() -> torch.Tensor:
    """Each class's smooth colour pattern (10, 3, 32, 32) int16: made once, taken by every make() call."""
    patterns = torch.rand(10, 3, 4, 4, generator=torch.Generator().manual_seed(20170709))
    patterns = F.interpolate(patterns, size=(32, 32), mode="bilinear", align_corners=False)
    return (51 + 153 * patterns).round().to(torch.int16)


def make(indices: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 number `indices` of the set of this seed.

    Counter-based: image i is a hash of (seed, i) alone, the same whichever others are asked for, so a run makes
    only the images its splits take (a few hundred of a test run's "50,000" cost nothing). The patterns are the
    same for every seed, so train and test agree.
    """
    patterns = _patterns()
    key = int(_mix32(torch.tensor(seed & _M32)) ^ 0x2545F491)
    images, labels = [], []
    for chunk in indices.to(torch.int64).split(_CHUNK):
        counters = chunk[:, None] * (_NOISE_CELLS + 1) + torch.arange(_NOISE_CELLS + 1)  # slot 0: the label
        draws = _mix32((counters & _M32) ^ key)
        y = draws[:, 0] % 10
        noise = (draws[:, 1:] % 81 - 40).to(torch.int16).view(-1, 3, 16, 1, 16, 1)
        noise = noise.expand(-1, 3, 16, 2, 16, 2).reshape(-1, 3, 32, 32)
        images.append((patterns[y] + noise).clamp_(0, 255).to(torch.uint8))
        labels.append(y)
    return torch.cat(images), torch.cat(labels)  # split() gives one empty chunk for no indices


def first(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n images and labels of the set of this seed (see make)."""
    return make(torch.arange(n), seed)
