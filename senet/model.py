"""The seed notebook's SENet: a post-activation ResNet whose BasicBlocks carry an SE gate.

Module and parameter names follow the seed exactly (`conv1`, `bn1`, `layer1.0.fc1`, ..., `linear`),
so a state_dict saved from the seed's classes loads here with `strict=True`.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class BasicBlock(nn.Module):
    """Two 3x3 convolutions, a squeeze-and-excitation gate on the residual branch, then the shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, reduction: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        # The excitation's two fully connected layers, as 1x1 convolutions (the seed's names).
        # max(1, ...) keeps narrow test models valid; at the default width it equals the seed's //.
        squeezed = max(1, out_channels // reduction)
        self.fc1 = nn.Conv2d(out_channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        w = out.mean((2, 3), keepdim=True)  # squeeze: one number per channel (the seed's avg_pool2d, one reduction)
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(w))))  # excitation: a gate in (0, 1) per channel
        # scale and residual add in one kernel (shortcut + out * w), the ReLU in place on its fresh result
        return F.relu(torch.addcmul(self.shortcut(x), out, w), inplace=True)


class SENet(nn.Module):
    """3x3 stem, four stages of BasicBlocks (strides 1, 2, 2, 2), 4x4 average pool, linear classifier."""

    def __init__(
        self,
        blocks_per_stage: tuple[int, ...] = (2, 2, 2, 2),
        *,
        width: int = 64,
        reduction: int = 16,
        num_classes: int = 10,
        bn_momentum: float = 0.1,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = width
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(width, blocks_per_stage[0], 1, reduction)
        self.layer2 = self._make_layer(2 * width, blocks_per_stage[1], 2, reduction)
        self.layer3 = self._make_layer(4 * width, blocks_per_stage[2], 2, reduction)
        self.layer4 = self._make_layer(8 * width, blocks_per_stage[3], 2, reduction)
        self.linear = nn.Linear(8 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = bn_momentum  # torch's meaning: the weight of each new batch in the running statistics
        if zero_init_residual:  # each block starts as its shortcut (Goyal et al.; torchvision's option of this name)
            for block in self.modules():
                if isinstance(block, BasicBlock):
                    nn.init.zeros_(block.bn2.weight)

    @torch.no_grad()
    def whiten_stem_(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Initialise conv1 from the eigenvectors of the 3x3 patch covariance of images (normalised float,
        (N, 3, H, W)), each scaled by 1/sqrt(eigenvalue), as a pair +v / -v, strongest first; filters beyond the
        patch dimensions keep their initialisation (airbench's whitening, for this stem's shape)."""
        weight = self.conv1.weight
        c, k = weight.shape[1], weight.shape[2]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp(min=0) + eps)[:, None]).flip(0)
        pairs = torch.stack([filters, -filters], 1).reshape(-1, c, k, k)[:len(weight)]
        weight[:len(pairs)] = pairs.to(weight)

    def _make_layer(self, out_channels: int, blocks: int, stride: int, reduction: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_channels, out_channels, s, reduction))
            self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.flatten(1))


class Normalize(nn.Module):
    """Per-channel (x - mean) / std for images given as 0..255 values (uint8 or float), channels first."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


class FlipAverage(nn.Module):
    """Flip test-time augmentation: the mean of the model's logits for each image and for its horizontal mirror."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x).float() + self.model(x.flip(3)).float()) / 2


class MultiCropAverage(nn.Module):
    """Flip and shift test-time augmentation (airbench's level 2): half the weight on the image and its mirror,
    a quarter each on the pair shifted one pixel up-left and the pair shifted down-right (reflect-padded).
    Takes normalised float images."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.flips = FlipAverage(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = self.flips(padded[..., :-2, :-2]) + self.flips(padded[..., 2:, 2:])
        return 0.5 * self.flips(x) + 0.25 * shifted


TTA = ("none", "flip", "multicrop")


def with_tta(model: nn.Module, tta: str) -> nn.Module:
    """model behind the test-time augmentation tta names: none, flip (FlipAverage) or multicrop (MultiCropAverage)."""
    if tta not in TTA:
        raise ValueError(f"tta must be one of {TTA}, got {tta!r}")
    return {"none": lambda m: m, "flip": FlipAverage, "multicrop": MultiCropAverage}[tta](model)


def senet(depth: int = 18, *, width: int = 64, reduction: int = 16, num_classes: int = 10,
          bn_momentum: float = 0.1, zero_init_residual: bool = False) -> SENet:
    """SENet of the given depth (18 or 34)."""
    if depth not in BLOCKS_PER_STAGE:
        raise ValueError(f"depth must be one of {sorted(BLOCKS_PER_STAGE)}, got {depth}")
    return SENet(BLOCKS_PER_STAGE[depth], width=width, reduction=reduction, num_classes=num_classes,
                 bn_momentum=bn_momentum, zero_init_residual=zero_init_residual)


def senet18(**kwargs) -> SENet:
    """The seed's SENet18 (blocks 2, 2, 2, 2; width 64; reduction 16; 10 classes) unless overridden."""
    return senet(18, **kwargs)


def senet34(**kwargs) -> SENet:
    """SENet34: blocks 3, 4, 6, 3."""
    return senet(34, **kwargs)
