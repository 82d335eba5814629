"""The recipe's options: EMA, flip TTA, SyncBatchNorm's rule, gradient clipping, MixUp/CutMix, bf16 on CPUs
that have it; in process where the logic is pure, end to end for the bit-exact resume with all of them on."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from job import checkpoint, config
from job.config import ConfigError
from job.distributed import Runtime
from job.scoring import evaluate
from job import averaging
from job.averaging import EMA, Lookahead
from job.loop import autocast_dtype, mix, mixer, native_bf16_cpu, train_step
from job.launch import use_sync_bn
from senet import senet18
from tests.conftest import COMMON, assert_same_as, load_ckpt, read_metrics, run_job

pytestmark = pytest.mark.slow  # torchrun launches (tests/conftest.py SLOW_FIXTURES)

CPU = Runtime(rank=0, local_rank=0, world_size=1, local_world_size=1, num_nodes=1, device=torch.device("cpu"),
              backend="gloo")


@pytest.fixture(scope="module")
def group():
    """A one-process gloo group, as `python -m job.train` makes without torchrun (evaluate all-reduces)."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ema_averages_weights_and_batchnorm_buffers_with_a_warmed_up_decay():
    model = senet18(width=4)
    ema = EMA(model, decay=0.9, every=2)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        model.linear.weight.add_(1.0)
        model.bn1.running_mean.add_(2.0)
        model.bn1.num_batches_tracked.fill_(7)
    ema.update(1, 100)  # not an update step (every 2)
    assert torch.equal(ema.module.linear.weight, start["linear.weight"])
    ema.update(2, 100)  # the first update: decay min(0.9, 1/10) = 0.1, so 90% of the way to the model
    assert torch.allclose(ema.module.linear.weight, start["linear.weight"] + 0.9)
    assert torch.allclose(ema.module.bn1.running_mean, start["bn1.running_mean"] + 1.8)  # buffers too
    assert int(ema.module.bn1.num_batches_tracked) == 7  # integer buffers are copied, not averaged
    assert ema.rate(0) == pytest.approx(0.1) and ema.rate(10) == pytest.approx(11 / 20) and ema.rate(10**6) == 0.9
    ema.update(4, 100)  # the second: decay 2/11
    assert torch.allclose(ema.module.linear.weight, start["linear.weight"] + 0.9 + 0.1 * (9 / 11), atol=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_lookahead_pulls_the_model_to_its_slow_weights_with_a_ramped_decay():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ahead = Lookahead(model, decay=0.9, every=5)
    with torch.no_grad():
        model.weight.fill_(1.0)  # the trained (fast) weights moved
    ahead.update(4, 10)  # not a multiple of every: nothing
    assert torch.equal(model.weight, torch.ones(2, 2))
    ahead.update(5, 10)  # rho = 0.9**5 * (5/10)**3: the slow weights move 1 - rho toward the fast ones
    rho = 0.9**5 * 0.5**3
    assert torch.allclose(model.weight, torch.full((2, 2), 1 - rho))  # and the model takes them
    with torch.no_grad():
        model.weight.fill_(5.0)
    ahead.end_epoch()  # the model goes back to the slow weights
    assert torch.allclose(model.weight, torch.full((2, 2), 1 - rho))
    restored = Lookahead(model, decay=0.9, every=5)
    restored.load_state_dict(ahead.state_dict())
    assert torch.equal(restored.state_dict()["slow"][0], ahead.state_dict()["slow"][0])


def test_averaging_is_built_from_the_config():
    model = senet18(width=4)
    assert averaging.build(model, 0.0, "average", 1) is None
    assert isinstance(averaging.build(model, 0.99, "average", 1), EMA)
    ahead = averaging.build(model, 0.95, "lookahead", 5)
    assert isinstance(ahead, Lookahead) and ahead.every == 5


def test_compiled_evaluation_pads_the_last_batch_to_one_shape_and_scores_the_same(group):
    """20 images at batch 8: the last batch of 4 is padded, so the compiled model sees one shape only."""
    torch.manual_seed(0)
    model = senet18(width=4).eval()
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (20,))
    plain = evaluate(model, images, labels, CPU, batch_size=8)
    shapes = []

    def backend(graph, inputs):  # records each graph torch.compile makes (one per input shape), runs it eagerly
        shapes.append([tuple(t.shape) for t in inputs if t.dim() == 4 and t.shape[-1] == 32][0])
        return graph.forward

    torch._dynamo.reset()
    compiled = evaluate(torch.compile(model, backend=backend, dynamic=False), images, labels, CPU, batch_size=8)
    assert len(shapes) == 1 and shapes[0][0] == 8
    assert torch.equal(compiled.confusion, plain.confusion) and compiled.loss == pytest.approx(plain.loss, rel=1e-6)
    assert compiled.count == 20


def test_flip_tta_scores_the_mean_of_both_views(group):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))  # not flip-invariant
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (20,))
    plain = evaluate(model, images, labels, CPU, batch_size=8)
    both = evaluate(model, images, labels, CPU, batch_size=8, tta="flip")
    from job.data import normalize
    with torch.no_grad():
        x = normalize(images)
        logits = (model(x) + model(x.flip(3))) / 2
    assert both.loss == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert both.accuracy == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert both.loss != pytest.approx(plain.loss)


@pytest.mark.parametrize("setting,device,world,batch,on", [
    ("auto", "cpu", 4, 8, False), ("auto", "cuda", 4, 8, True), ("auto", "cuda", 4, 32, False),
    ("auto", "cuda", 1, 8, False), (False, "cuda", 4, 8, False), (True, "cuda", 4, 128, True)])
def test_sync_bn_auto_turns_on_below_32_images_per_cuda_rank(setting, device, world, batch, on):
    runtime = Runtime(rank=0, local_rank=0, world_size=world, local_world_size=world, num_nodes=1,
                      device=torch.device(device), backend="nccl" if device == "cuda" else "gloo")
    assert use_sync_bn(setting, batch, runtime) is on


def test_sync_bn_true_on_the_cpu_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="train.sync_bn=true needs CUDA"):
        use_sync_bn(True, 8, CPU)


def test_clipping_bounds_the_gradient_norm():
    torch.manual_seed(0)
    model = senet18(width=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x, y = torch.randn(8, 3, 32, 32) * 50, torch.randint(0, 10, (8,))

    def grad_norm(clip: float) -> float:
        train_step(model, optimizer, scaler, x, y, dtype=None, label_smoothing=0.0, clip_grad_norm=clip)
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    assert grad_norm(0.0) > 0.1
    assert grad_norm(0.1) == pytest.approx(0.1, rel=1e-4)


def test_mixup_and_cutmix_are_torchvisions_and_a_pure_function_of_the_step():
    from torchvision.transforms import v2

    assert mixer(0, 0) is None
    assert isinstance(mixer(0.2, 0), v2.MixUp) and isinstance(mixer(0, 1.0), v2.CutMix)
    assert isinstance(mixer(0.2, 1.0), v2.RandomChoice)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    fn = mixer(0.2, 1.0)
    (a, ta), (b, tb), (c, _) = mix(fn, x, y, seed=5), mix(fn, x, y, seed=5), mix(fn, x, y, seed=6)
    assert torch.equal(a, b) and torch.equal(ta, tb) and not torch.equal(a, c)
    assert ta.shape == (16, 10) and torch.allclose(ta.sum(1), torch.ones(16))
    state = torch.get_rng_state()
    mix(fn, x, y, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left as it was


def test_new_keys_reject_bad_values_in_one_line():
    for override, message in [("train.ema_decay=1.0", "train.ema_decay must be in [0, 1) (0 = off), got 1.0"),
                              ("train.tta=hflip", "train.tta must be none, flip or multicrop, got 'hflip'"),
                              ("train.sync_bn=maybe", "train.sync_bn must be auto, true or false, got 'maybe'"),
                              ("train.clip_grad_norm=-1", "train.clip_grad_norm must be >= 0 (0 = off), got -1.0"),
                              ("data.mixup_alpha=-0.2", "data.mixup_alpha must be in [0, 10] (0 = off), got -0.2"),
                              ("data.cutmix_alpha=x", "data.cutmix_alpha must be a number, got 'x'")]:
        with pytest.raises(ConfigError) as e:
            config.load(None, [override])
        assert str(e.value) == message


def test_auto_precision_follows_the_cpus_bf16_support():
    expected = torch.bfloat16 if native_bf16_cpu() else None
    assert autocast_dtype("auto", torch.device("cpu")) == expected
    assert autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert autocast_dtype("fp32", torch.device("cuda")) is None


RECIPE = ["train.ema_decay=0.9", "train.ema_every_steps=2", "train.tta=multicrop", "train.clip_grad_norm=1.0",
          "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0", "data.pad_mode=reflect", "data.crop_padding=2",
          "data.flip=alternate", "data.cutout=8", "model.zero_init_residual=true", "model.bn_momentum=0.2",
          "train.bn_bias_lr_mult=4", "train.whiten_stem=true"]
LOOKAHEAD = ["train.ema_mode=lookahead", "train.ema_every_steps=3", "train.label_smoothing=0.2"]


def test_lookahead_resumes_bit_for_bit(tmp_path):
    """The slow weights are in the checkpoint and the decay follows the step count: a resume mid-epoch and at an
    epoch's end goes on exactly (the mid-epoch stop also proves the averaging has no per-launch counter)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    recipe = [*COMMON, *RECIPE, *LOOKAHEAD]
    assert run_job([*recipe, f"train.out_dir={straight}"]).returncode == 0
    for extra in (["train.stop_after_epochs=1"], []):
        result = run_job([*recipe, f"train.out_dir={split}", *extra])
        assert result.returncode == 0, result.stderr[-3000:]
    assert_same_as(straight, split)
    a, b = load_ckpt(straight / "checkpoints" / "last.pt"), load_ckpt(split / "checkpoints" / "last.pt")
    assert "ema" not in a and all(torch.equal(x, y) for x, y in zip(a["lookahead"]["slow"], b["lookahead"]["slow"]))
    # at an epoch's end the model holds the slow weights: what validation, best.pt and the registry use
    weights = [v for v in a["model"].values() if v.is_floating_point()]
    assert all(torch.equal(w, s) for w, s in zip(weights, a["lookahead"]["slow"]))


def test_every_option_on_resumes_bit_for_bit_and_predicts_with_the_ema(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    result = run_job([*COMMON, *RECIPE, f"train.out_dir={straight}"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metrics(straight)[-1]["test_acc"] > 0.5  # still learns (chance is 0.1)
    for extra in (["train.stop_after_epochs=1"], []):
        result = run_job([*COMMON, *RECIPE, f"train.out_dir={split}", *extra], nproc=2)
        assert result.returncode == 0, result.stderr[-3000:]
    assert_same_as(straight, split)
    a, b = load_ckpt(straight / "checkpoints" / "last.pt"), load_ckpt(split / "checkpoints" / "last.pt")
    assert all(torch.equal(a["ema"]["model"][k], b["ema"]["model"][k]) for k in a["ema"]["model"])
    best = load_ckpt(straight / "checkpoints" / "best.pt")
    assert checkpoint.weights(best) is best["ema"]["model"]
    assert not all(torch.equal(best["ema"]["model"][k], best["model"][k]) for k in best["model"])

    config_before = (split / "config.yaml").read_text()
    (split / "finished.json").unlink()  # as if stopped after its last epoch: a finished run refuses any change
    model = [a for a in RECIPE if a.startswith("model.")]  # the same model, but EMA off: its weights would be lost
    refused = run_job([*COMMON, *model, f"train.out_dir={split}", "train.epochs=4"])
    assert refused.returncode == 1
    assert refused.stderr.strip() == (f"error: checkpoint {split / 'checkpoints' / 'last.pt'} was trained with "
                                      f"train.ema_decay=0.9: resume it with the same (this launch has 0.0)")
    assert (split / "config.yaml").read_text() == config_before  # refused before anything was written


def test_sync_bn_true_on_the_cpu_fails_before_any_work(tmp_path):
    result = run_job([*COMMON, "train.sync_bn=true", f"train.out_dir={tmp_path / 'out'}"])
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: train.sync_bn=true needs CUDA: PyTorch's SyncBatchNorm has no CPU implementation (use auto or false)")
    assert not (tmp_path / "out").exists()
