"""The fast-training methods (issue 19), in process: augmentation (translate, reflect padding, alternating flip,
cutout), MixUp's targets, BatchNorm options, the whitened stem, the BN-bias learning rate, multi-crop TTA (also in
the registered model and its .pt2), the emulated-bf16 warning and the checkpoint's averaging state."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from job import config, data, optim, registry, resume
from job.checkpoint import CheckpointError
from job.config import ConfigError
from job.loop import hits, precision_warning, train_step
from senet import FlipAverage, MultiCropAverage, senet18, with_tta

NO_FLIP = torch.zeros(8, dtype=torch.bool)


def images(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def shifts(seed: int, n: int, padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The crop offsets augment() draws first from a generator seeded with seed."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2 * padding + 1, (n, 1), generator=g),
            torch.randint(0, 2 * padding + 1, (n, 1), generator=g))


@pytest.mark.parametrize("pad_mode,torch_mode", [("zeros", "constant"), ("reflect", "reflect")])
@pytest.mark.parametrize("padding", [2, 4])
def test_a_crop_is_a_window_of_the_padded_image(pad_mode, torch_mode, padding):
    x = images()
    out = data.augment(x, torch.Generator().manual_seed(3), padding=padding, pad_mode=pad_mode, flip=NO_FLIP)
    padded = F.pad(x.float(), (padding,) * 4, mode=torch_mode)
    dy, dx = shifts(3, 8, padding)
    for i in range(8):
        window = padded[i, :, dy[i, 0]:dy[i, 0] + 32, dx[i, 0]:dx[i, 0] + 32]
        assert torch.equal(out[i].float(), window)
    if pad_mode == "reflect":
        assert not (out == 0).all(1).any()  # no black border pixels (random images have almost no 0,0,0 pixels)


def test_no_padding_means_no_translation_and_the_flip_mask_is_obeyed():
    x = images()
    mask = torch.tensor([True, False] * 4)
    out = data.augment(x, torch.Generator().manual_seed(0), padding=0, flip=mask)
    assert torch.equal(out[1::2], x[1::2]) and torch.equal(out[::2], x[::2].flip(3))


@pytest.mark.parametrize("side", [1, 8, 16])
def test_cutout_cuts_a_square_of_exactly_its_side_filled_with_the_mean(side):
    x = torch.zeros(64, 3, 32, 32, dtype=torch.uint8)  # black, so every pixel the hole covers changes
    out = data.augment(x, torch.Generator().manual_seed(1), side, padding=0, flip=torch.zeros(64, dtype=torch.bool))
    hole = (out != 0).any(1)  # (N, 32, 32)
    rows, cols = hole.any(2).sum(1), hole.any(1).sum(1)
    inside = (rows == side) & (cols == side)  # holes clipped by a border are smaller
    assert inside.sum() > 10 and (hole.sum((1, 2))[inside] == side * side).all()
    assert (rows <= side).all() and (cols <= side).all()
    mean = torch.tensor([round(m * 255) for m in data.MEAN], dtype=torch.uint8)
    filled = out.permute(0, 2, 3, 1)[hole]
    assert (filled == mean).all()
    assert data.normalize(mean.view(1, 3, 1, 1)).abs().max() < 0.01  # the mean is ~0 after normalisation


def test_alternate_flips_each_image_on_every_other_epoch_the_same_in_every_process():
    first, second, third = (data.flips(1000, 7, epoch, "alternate", torch.device("cpu")) for epoch in (0, 1, 2))
    assert torch.equal(first, ~second) and torch.equal(first, third)
    assert 400 < int(first.sum()) < 600  # the first side is random per image
    assert torch.equal(first, data.flips(1000, 7, 0, "alternate", torch.device("cpu")))
    assert not torch.equal(first, data.flips(1000, 8, 0, "alternate", torch.device("cpu")))  # per seed
    assert data.flips(10, 7, 0, "random", torch.device("cpu")) is None
    assert not data.flips(10, 7, 1, "none", torch.device("cpu")).any()


def test_mixed_targets_are_smoothed_once_and_train_accuracy_scores_them():
    from job.loop import mix, mixer

    torch.manual_seed(0)
    labels = torch.randint(0, 10, (8,))
    _, soft = mix(mixer(0.2, 0.0), torch.randn(8, 3, 32, 32), labels, seed=3)
    lam = soft.max(1).values  # torchvision's mixed targets: two one-hot rows mixed, no smoothing of their own
    assert torch.allclose(soft.sum(1), torch.ones(8)) and ((soft > 0).sum(1) <= 2).all() and (lam >= 0.5).all()
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = torch.randn(8, 3, 32, 32)
    loss, logits = train_step(model, optimizer, scaler, x, soft, dtype=None, label_smoothing=0.2)
    smoothed_once = F.cross_entropy(logits, soft, label_smoothing=0.2)
    assert loss.item() == pytest.approx(smoothed_once.item(), rel=1e-6)
    assert loss.item() != pytest.approx(F.cross_entropy(logits, soft).item(), rel=1e-3)
    labels = torch.randint(0, 10, (8,))
    loss, logits = train_step(model, optimizer, scaler, x, labels, dtype=None, label_smoothing=0.2)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.2).item(), rel=1e-6)

    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0]])
    assert hits(logits, torch.tensor([0, 2])).item() == 1
    mixed = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6]])  # predicted 0 and 1: 0.7 + 0.4
    assert hits(logits, mixed).item() == pytest.approx(1.1)


def test_bn_momentum_and_zero_init_residual():
    model = senet18(width=8, bn_momentum=0.4, zero_init_residual=True)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.4 for m in bns)
    blocks = [model.layer1[0], model.layer4[1]]
    assert all(torch.equal(b.bn2.weight, torch.zeros_like(b.bn2.weight)) for b in blocks)
    assert torch.equal(model.bn1.weight, torch.ones_like(model.bn1.weight))  # only each block's last BN
    x = torch.randn(4, 8, 8, 8)
    block = model.layer1[0].eval()
    assert torch.allclose(block(x), F.relu(x))  # the block starts as its (identity) shortcut
    assert senet18(width=8).layer1[0].bn2.weight.abs().sum() > 0
    with pytest.raises(ConfigError, match=r"model.bn_momentum must be in \(0, 1\], got 0.0"):
        config.load(None, ["model.bn_momentum=0"])


def test_the_whitened_stem_decorrelates_3x3_patches():
    g = torch.Generator().manual_seed(0)
    smooth = F.avg_pool2d(torch.randn(64, 3, 36, 36, generator=g), 5, stride=1)  # correlated neighbours
    model = senet18(width=64)
    model.whiten_stem_(smooth, eps=1e-6)
    out = F.conv2d(smooth, model.conv1.weight)  # the valid positions: exactly the patches
    first = out[:, 0:54:2].permute(0, 2, 3, 1).reshape(-1, 27)  # the +v filter of each of the 27 pairs
    covariance = first.T @ first / len(first)
    assert torch.allclose(covariance, torch.eye(27), atol=0.02)
    assert torch.allclose(model.conv1.weight[1:54:2], -model.conv1.weight[0:54:2])  # each with its negative
    assert model.conv1.weight[54:].abs().sum() > 0  # the filters past the pairs keep their random start
    narrow = senet18(width=8)
    narrow.whiten_stem_(smooth, eps=1e-6)  # fewer filters than pairs: the strongest 4 pairs
    assert torch.allclose(narrow.conv1.weight, model.conv1.weight[:8], atol=1e-5)


def test_bn_biases_train_at_their_multiple_of_the_learning_rate():
    model = senet18(width=4)
    plain = optim.build_optimizer(model, config.TrainConfig(lr=0.1, batch_size=128, ref_batch_size=128))
    assert len(plain.param_groups) == 2  # as before: checkpoints of earlier runs still load
    cfg = config.TrainConfig(lr=0.1, batch_size=128, ref_batch_size=128, bn_bias_lr_mult=8)
    opt = optim.build_optimizer(model, cfg)
    fast = opt.param_groups[2]
    biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert {id(p) for p in fast["params"]} == biases and fast["lr"] == pytest.approx(0.8)
    assert fast["weight_decay"] == 0.0
    counted = sum(len(g["params"]) for g in opt.param_groups)
    assert counted == len(list(model.parameters()))  # each parameter once
    scheduler = optim.build_scheduler(opt, cfg, steps_per_epoch=10)
    for _ in range(7):
        opt.step()
        scheduler.step()
    assert opt.param_groups[2]["lr"] == pytest.approx(8 * opt.param_groups[1]["lr"])  # through the schedule


def test_multicrop_tta_weights_the_image_pair_half_and_each_shifted_pair_a_quarter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))  # neither flip- nor shift-invariant
    x = torch.randn(4, 3, 32, 32)
    pair = FlipAverage(model)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    expected = 0.5 * pair(x) + 0.25 * pair(padded[:, :, :32, :32]) + 0.25 * pair(padded[:, :, 2:, 2:])
    assert torch.allclose(MultiCropAverage(model)(x), expected, atol=1e-6)
    assert with_tta(model, "none") is model and isinstance(with_tta(model, "flip"), FlipAverage)
    with pytest.raises(ValueError, match="tta must be one of"):
        with_tta(model, "five-crop")


@pytest.mark.slow
def test_the_registered_model_and_its_export_carry_multicrop_tta(tmp_path: Path):
    torch.manual_seed(0)
    net = senet18(width=4).eval()
    model = {"depth": 18, "width": 4, "reduction": 16}
    served = registry.servable(net.state_dict(), model, "multicrop")
    x = images(4)
    expected = MultiCropAverage(net)(data.normalize(x))
    with torch.no_grad():
        assert torch.allclose(served(x), expected, atol=1e-5)
        registry.export(served, x, tmp_path / "model.pt2")
        exported = torch.export.load(tmp_path / "model.pt2").module()
        assert torch.allclose(exported(images(3, seed=1)), served(images(3, seed=1)), atol=1e-4)  # any batch size


def test_bf16_on_a_cpu_that_emulates_it_is_named_in_one_line(monkeypatch):
    from job import loop

    monkeypatch.setattr(loop, "native_bf16_cpu", lambda: False)
    line = precision_warning("bf16", torch.device("cpu"))
    assert line.startswith("train.precision=bf16 on a CPU without native bf16") and "\n" not in line
    assert precision_warning("auto", torch.device("cpu")) is None
    assert precision_warning("bf16", torch.device("cuda")) is None
    monkeypatch.setattr(loop, "native_bf16_cpu", lambda: True)
    assert precision_warning("bf16", torch.device("cpu")) is None


def saved(model: dict | None = None, **train) -> dict:
    cfg = config.load(None, [f"train.{k}={v}" for k, v in train.items()]).to_dict()
    if model is not None:
        cfg["model"] = model
    return {"config": cfg, "model": {}, "train_state": {"epoch": 1}}


def test_a_checkpoint_keeps_the_averaging_it_was_trained_with():
    path = Path("last.pt")
    lookahead = config.load(None, ["train.ema_decay=0.9", "train.ema_mode=lookahead"])
    resume.check_compatible({**saved(ema_decay=0.9, ema_mode="lookahead"), "lookahead": {}}, lookahead, path)
    with pytest.raises(CheckpointError, match=r"was trained with train.ema_decay=0.9 ema_mode=lookahead: resume it "
                                              r"with the same \(this launch has 0.9\)"):
        resume.check_compatible({**saved(ema_decay=0.9, ema_mode="lookahead"), "lookahead": {}},
                                    config.load(None, ["train.ema_decay=0.9"]), path)
    with pytest.raises(CheckpointError, match=r"\(this launch has 0.9 ema_mode=lookahead\)"):
        resume.check_compatible({**saved(ema_decay=0.9), "ema": {}}, lookahead, path)


def test_a_checkpoint_from_before_the_new_model_keys_still_resumes():
    old = saved(model={"depth": 18, "width": 64, "reduction": 16})
    resume.check_compatible(old, config.load(None, []), Path("last.pt"))  # their defaults then
    with pytest.raises(CheckpointError, match="zero_init_residual=False"):
        resume.check_compatible(old, config.load(None, ["model.zero_init_residual=true"]), Path("last.pt"))


@pytest.mark.parametrize("mode", ["average", "lookahead"])
def test_an_averager_saved_mid_run_goes_on_exactly(mode):
    """What a checkpoint holds of the averaging (its state_dict and the model's) is all it needs: a copy restored
    at step 7 and updated to step 20 equals the one that never stopped, bit for bit (the decay follows the step)."""
    from job import averaging

    def run(model, averager, steps):
        for step in steps:
            with torch.no_grad():
                for p in model.parameters():  # a stand-in for an optimizer step, a pure function of the step
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(step)))
            averager.update(step, 20)
            if step % 10 == 0:
                averager.end_epoch()

    torch.manual_seed(0)
    straight = senet18(width=4)
    split = senet18(width=4)
    split.load_state_dict(straight.state_dict())
    a = averaging.build(straight, 0.9, mode, 2)
    run(straight, a, range(1, 21))
    b = averaging.build(split, 0.9, mode, 2)
    run(split, b, range(1, 8))
    saved = {"model": {k: v.clone() for k, v in split.state_dict().items()},
             "averager": {k: [t.clone() for t in v] if isinstance(v, list) else
                          {n: t.clone() for n, t in v.items()} for k, v in b.state_dict().items()}}
    resumed = senet18(width=4)
    resumed.load_state_dict(saved["model"])
    c = averaging.build(resumed, 0.9, mode, 2)
    c.load_state_dict(saved["averager"])
    run(resumed, c, range(8, 21))
    ends = [(straight, resumed)] + ([(a.module, c.module)] if mode == "average" else [])
    for x, y in ends:
        assert all(torch.equal(p, q) for p, q in zip(x.state_dict().values(), y.state_dict().values()))
    if mode == "lookahead":
        with pytest.raises(ValueError, match="lookahead state of 3 tensors"):
            c.load_state_dict({"slow": saved["averager"]["slow"][:3]})


def test_a_checkpoint_from_before_the_new_keys_compares_them_at_their_defaults():
    old = saved(model={"depth": 18, "width": 64, "reduction": 16})
    for section in ("data", "train"):
        for key in ("bn_bias_lr_mult", "flip", "pad_mode", "crop_padding", "whiten_stem", "ema_mode"):
            old["config"][section].pop(key, None)
    applies, refused = resume.config_changes(old["config"], config.load(None, ["train.bn_bias_lr_mult=8",
                                                                                   "data.flip=alternate"]))
    assert applies == ["data.flip random -> alternate"] and refused == ["train.bn_bias_lr_mult 1.0 -> 8.0"]


@pytest.mark.parametrize("overrides,says", [
    (["train.ema_mode=lookahead"], "train.ema_mode=lookahead / ema_every_steps=1 do nothing while train.ema_decay "
                                   "is 0 (off): set train.ema_decay too (airbench's Lookahead: 0.95)"),
    (["train.ema_every_steps=5"], "train.ema_mode=average / ema_every_steps=5 do nothing while train.ema_decay is 0"),
    (["data.pad_mode=reflect", "data.crop_padding=0"],
     "data.pad_mode=reflect does nothing with data.crop_padding=0 (no translation, no padding)")])
def test_settings_that_would_do_nothing_are_refused(overrides, says):
    with pytest.raises(ConfigError) as e:
        config.load(None, overrides)
    assert str(e.value).startswith(says)
    config.load(None, [*overrides, "train.ema_decay=0.9", "data.crop_padding=2"])  # with what they need: fine
