"""The default senet18 is the seed notebook's SENet: same names, shapes, weights and outputs."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from senet import senet, senet18, senet34

# ---- The seed's two classes, copied verbatim from ../shared/seed/ (comments translated away only) ----


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


def _randomize_bn(model: nn.Module, seed: int) -> None:
    """Non-trivial running statistics, so that eval-mode outputs depend on every buffer."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def test_seed_state_dict_loads_strictly_and_gives_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    seed_model = SENet()
    _randomize_bn(seed_model, 1)
    path = tmp_path / "seed.pt"
    torch.save(seed_model.state_dict(), path)

    ours = senet18()
    seed_state = torch.load(path, weights_only=True)
    assert list(ours.state_dict()) == list(seed_state)  # same names, same order
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in seed_state.items()}
    ours.load_state_dict(seed_state, strict=True)

    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    seed_model.eval(), ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(x), seed_model(x))
    seed_model.train(), ours.train()
    assert torch.equal(ours(x), seed_model(x))  # training mode too (batch statistics)


def test_same_initialisation_as_the_seed_under_the_same_rng():
    torch.manual_seed(3)
    seed_state = SENet().state_dict()
    torch.manual_seed(3)
    ours = senet18().state_dict()
    assert all(torch.equal(seed_state[k], ours[k]) for k in seed_state)


def test_named_parameters_of_the_default():
    names = dict(senet18().named_parameters())
    for name in ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer1.0.fc1.weight",
                 "layer2.0.shortcut.0.weight", "layer4.1.fc2.bias", "linear.weight"):
        assert name in names
    assert names["layer4.1.fc1.weight"].shape == (32, 512, 1, 1)  # reduction 16
    assert names["linear.weight"].shape == (10, 512)
    assert sum(p.numel() for p in names.values()) == sum(p.numel() for p in SENet().parameters())


@pytest.mark.parametrize("depth,blocks", [(18, [2, 2, 2, 2]), (34, [3, 4, 6, 3])])
def test_depth_width_reduction_and_classes(depth, blocks):
    model = senet(depth, width=8, reduction=4, num_classes=7)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == blocks
    assert model.layer1[0].fc1.out_channels == 2  # 8 // 4
    assert model.linear.in_features == 64 and model.linear.out_features == 7
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert senet34(width=8).layer3[5].conv2.out_channels == 32


def test_narrow_models_keep_at_least_one_squeezed_channel():
    model = senet18(width=8)  # 8 // 16 would be 0 channels
    assert model.layer1[0].fc1.out_channels == 1
    model(torch.randn(2, 3, 32, 32)).sum().backward()


def test_unknown_depth_is_rejected():
    with pytest.raises(ValueError, match="depth must be one of"):
        senet(50)


def test_senet_imports_nothing_from_job_distributed_mlflow_or_yaml():
    root = Path(__file__).resolve().parents[1] / "senet"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(("job", "torch.distributed", "mlflow", "yaml")), (path, name)
    # and at run time: importing senet loads none of them
    code = "import sys, senet; print([m for m in ('job', 'mlflow', 'yaml') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=root.parent).stdout
    assert out.strip() == "[]"


def test_seed_file_still_matches_the_copy_above():
    """Where ../shared is present, the classes above are the seed's own lines."""
    seed_dir = Path(__file__).resolve().parents[2] / "shared" / "seed"
    if not seed_dir.is_dir():
        pytest.skip("../shared/seed is absent (it exists in development and CI only)")
    seed = "\n".join(p.read_text() for p in seed_dir.iterdir())
    for line in ("self.fc1 = nn.Conv2d(out_channels, out_channels//16, kernel_size=1)",
                 "w = F.sigmoid(self.fc2(w))", "out = F.avg_pool2d(out, 4)",
                 "self.layer4 = self._make_layer(BasicBlock, 512, 2, stride=2)",
                 "self.linear = nn.Linear(512, self.num_classes)"):
        assert line in seed
