"""(a) The seed-style baseline, written apart from the project: the seed's own classes (bench/seed.py), a
torchvision-style dataset of PIL images, torchvision transforms through a DataLoader, fp32 eager NCHW, a plain
SGD step.

Only the pixels (job.synthetic, so that no download is needed) and the step clock (job.clock) come from
the project; not its model, data path or step.
"""

import os
import time

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from bench.common import summarize
from bench.seed import SENet
from job.clock import StepClock
from job.synthetic import first as synthetic

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


class PILImages(Dataset):
    """torchvision.datasets.CIFAR10's shape: HWC uint8 array in memory, one PIL image per __getitem__."""

    def __init__(self, n: int, transform):
        images, labels = synthetic(n, seed=1)
        self.data = images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, 32, 32, 3), as CIFAR10 holds it
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.data[index])
        return self.transform(img), self.targets[index]


TRANSFORM = transforms.Compose([
    transforms.RandomCrop(32, padding=4),
    transforms.RandomHorizontalFlip(),
    transforms.ToTensor(),
    transforms.Normalize(MEAN, STD),
])


def loader(batch: int, steps: int, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """One epoch of exactly `steps` batches; for a GPU, pinned memory as a careful user would set it."""
    return DataLoader(PILImages(batch * steps, TRANSFORM), batch_size=batch, shuffle=True,
                      num_workers=num_workers, drop_last=True, pin_memory=pin_memory)


def train_steps(batch: int, steps: int, warmup: int, num_workers: int, device: torch.device) -> dict:
    """Images/s of the seed-style step, each step timed with its data loading (next batch, copy, step)."""
    torch.manual_seed(0)
    model = SENet().to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model.train()
    clock = StepClock(device)
    clock.mark()
    cuda = device.type == "cuda"
    for inputs, targets in loader(batch, warmup + steps, num_workers, pin_memory=cuda):
        inputs, targets = inputs.to(device, non_blocking=cuda), targets.to(device, non_blocking=cuda)
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = criterion(outputs, targets)
        loss.backward()
        optimizer.step()
        clock.mark()
    return summarize(clock.durations(), warmup, batch)


def loader_only(batch: int, steps: int, num_workers: int) -> float:
    """Images/s of the PIL pipeline alone (the DataLoader, no model), for context."""
    it = iter(loader(batch, steps + 1, num_workers))
    next(it)  # worker start-up
    tic = time.perf_counter()
    for _ in it:
        pass
    return batch * steps / (time.perf_counter() - tic)


def measure(*, batch: int, steps: int, warmup: int, device: str, num_workers: tuple[int, ...] | None = None) -> dict:
    """The seed-style step with each num_workers; the better one is the baseline. On CUDA, where PIL decoding
    would otherwise be what is measured, up to 8 workers (one per core) and pinned memory."""
    device = torch.device(device)
    if num_workers is None:
        num_workers = (0, min(8, os.cpu_count() or 1)) if device.type == "cuda" else (0, 1)
    runs = {}
    for workers in num_workers:
        runs[f"num_workers_{workers}"] = {**train_steps(batch, steps, warmup, workers, device),
                                          "loader_images_per_sec": loader_only(batch, steps, workers)}
    best = max(runs, key=lambda k: runs[k]["images_per_sec"])
    return {**runs[best], "best": best, "runs": runs}
