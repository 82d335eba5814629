"""(a) The seed-style baseline, written apart from the project: the seed's own classes, a torchvision-style
dataset of PIL images, torchvision transforms through a DataLoader, fp32 eager NCHW, a plain SGD step.

Only the pixels come from the project (job.data.synthetic), so that no download is needed.
"""

import time

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from bench.common import StepTimer, summarize
from job.data import synthetic

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

# ---- The seed's two classes, copied verbatim from tests/test_model.py (the seed's code, comments translated away) ----


class BasicBlock(nn.Module):
    def __init__(self, in_channels, out_channels, stride=1):
        super(BasicBlock, self).__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)

        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels))

        self.fc1 = nn.Conv2d(out_channels, out_channels//16, kernel_size=1)
        self.fc2 = nn.Conv2d(out_channels//16, out_channels, kernel_size=1)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))

        w = F.avg_pool2d(out, out.size(2))

        w = F.relu(self.fc1(w))
        w = F.sigmoid(self.fc2(w))

        out = out * w
        out += self.shortcut(x)
        out = F.relu(out)
        return out


class SENet(nn.Module):
    def __init__(self):
        super(SENet, self).__init__()
        self.num_classes = 10
        self.in_channels = 64

        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(BasicBlock,  64, 2, stride=1)
        self.layer2 = self._make_layer(BasicBlock, 128, 2, stride=2)
        self.layer3 = self._make_layer(BasicBlock, 256, 2, stride=2)
        self.layer4 = self._make_layer(BasicBlock, 512, 2, stride=2)
        self.linear = nn.Linear(512, self.num_classes)

    def _make_layer(self, block, out_channels, blocks, stride):
        strides = [stride] + [1]*(blocks-1)
        layers = []
        for stride in strides:
            layers.append(block(self.in_channels, out_channels, stride))
            self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = self.layer4(out)
        out = F.avg_pool2d(out, 4)
        out = out.view(out.size(0), -1)
        out = self.linear(out)
        return out

# ---- end of the seed's code ----


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


def loader(batch: int, steps: int, num_workers: int) -> DataLoader:
    """One epoch of exactly `steps` batches."""
    return DataLoader(PILImages(batch * steps, TRANSFORM), batch_size=batch, shuffle=True,
                      num_workers=num_workers, drop_last=True)


def train_steps(batch: int, steps: int, warmup: int, num_workers: int, device: torch.device) -> dict:
    """Images/s of the seed-style step, each step timed with its data loading (next batch, copy, step)."""
    torch.manual_seed(0)
    model = SENet().to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model.train()
    timer = StepTimer(device)
    timer.mark()
    for inputs, targets in loader(batch, warmup + steps, num_workers):
        inputs, targets = inputs.to(device), targets.to(device)
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = criterion(outputs, targets)
        loss.backward()
        optimizer.step()
        timer.mark()
    return summarize(timer.durations(), warmup, batch)


def loader_only(batch: int, steps: int, num_workers: int) -> float:
    """Images/s of the PIL pipeline alone (the DataLoader, no model), for context."""
    it = iter(loader(batch, steps + 1, num_workers))
    next(it)  # worker start-up
    tic = time.perf_counter()
    for _ in it:
        pass
    return batch * steps / (time.perf_counter() - tic)


def measure(*, batch: int, steps: int, warmup: int, device: str, num_workers: tuple[int, ...] = (0, 1)) -> dict:
    """The seed-style step with each num_workers; the better one is the baseline."""
    device = torch.device(device)
    runs = {}
    for workers in num_workers:
        runs[f"num_workers_{workers}"] = {**train_steps(batch, steps, warmup, workers, device),
                                          "loader_images_per_sec": loader_only(batch, steps, workers)}
    best = max(runs, key=lambda k: runs[k]["images_per_sec"])
    return {**runs[best], "best": best, "runs": runs}
