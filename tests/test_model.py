"""The default senet18 is the seed notebook's SENet: same names, shapes, weights and outputs."""

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from bench.seed import BasicBlock, SENet
from senet import senet, senet18, senet34


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
    with torch.no_grad():  # equal to float rounding: the squeeze is one mean, scale and add one addcmul
        assert torch.allclose(ours(x), seed_model(x), rtol=0, atol=1e-6)
    seed_model.train(), ours.train()
    assert torch.allclose(ours(x), seed_model(x), rtol=0, atol=1e-6)  # training mode too (batch statistics)


def test_the_fused_se_block_matches_the_seeds_outputs_and_gradients_to_1e_6():
    """The squeeze as mean((2, 3)) and shortcut + out * gate as one addcmul, against the seed's BasicBlock."""
    from bench.seed import BasicBlock as SeedBlock
    from senet import BasicBlock

    for in_ch, out_ch, stride in [(64, 64, 1), (64, 128, 2)]:
        torch.manual_seed(5)
        seed_block = SeedBlock(in_ch, out_ch, stride)
        ours = BasicBlock(in_ch, out_ch, stride)
        ours.load_state_dict(seed_block.state_dict(), strict=True)
        x = torch.randn(8, in_ch, 16, 16, generator=torch.Generator().manual_seed(6))
        x_seed, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_seed, y_ours = seed_block(x_seed), ours(x_ours)
        assert (y_ours - y_seed).abs().max() < 1e-6
        grad = torch.randn_like(y_seed)
        y_seed.backward(grad)
        y_ours.backward(grad)
        assert (x_ours.grad - x_seed.grad).abs().max() < 1e-6
        for (name, a), b in zip(ours.named_parameters(), seed_block.parameters()):
            assert (a.grad - b.grad).abs().max() < 1e-5 * max(1.0, b.grad.abs().max().item()), name


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


def _code(text: str) -> str:
    """The lines of code in text, one per line, framed by newlines: no comment lines, blank lines, trailing spaces."""
    lines = (line.rstrip() for line in text.splitlines())
    return "\n" + "\n".join(line for line in lines if line and not line.lstrip().startswith("#")) + "\n"


def test_bench_seed_is_the_seed_notebooks_two_classes_verbatim():
    """bench/seed.py holds BasicBlock and SENet and nothing else, each the seed's own lines less its comments."""
    seed_dir = Path(__file__).resolve().parents[2] / "shared" / "seed"
    if not seed_dir.is_dir():
        pytest.skip("../shared/seed is absent (it exists in development and CI only)")
    notebook = _code("\n".join(p.read_text() for p in sorted(seed_dir.iterdir())))
    _docstring, *body = ast.parse(Path(inspect.getfile(SENet)).read_text()).body
    assert [getattr(n, "name", type(n).__name__) for n in body if not isinstance(n, (ast.Import, ast.ImportFrom))] \
        == ["BasicBlock", "SENet"]
    for cls in (BasicBlock, SENet):
        assert _code(inspect.getsource(cls)) in notebook, cls.__name__
