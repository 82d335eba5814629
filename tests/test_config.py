"""Config: defaults, YAML, overrides, and one clear line for every mistake, before any work."""

import pytest
import yaml

from job import config
from job.config import Config, ConfigError
from tests.conftest import run_job


def test_defaults_are_the_dataclasses():
    cfg = config.load()
    assert cfg == Config()
    assert (cfg.model.depth, cfg.model.width, cfg.model.reduction) == (18, 64, 16)
    assert cfg.train.resume == "auto" and cfg.data.source == "cifar10"


def test_yaml_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  lr: 0.2\ndata:\n  train_subset: 100\n")
    cfg = config.load(str(path), ["train.epochs=9", "data.train_subset=null", "train.lr=1"])
    assert cfg.train.epochs == 9 and cfg.data.train_subset is None
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_exponent_without_a_dot_is_a_number(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  weight_decay: 5e-4\n")
    cfg = config.load(str(tmp_path / "c.yaml"), ["train.lr=1e-3"])
    assert cfg.train.lr == 0.001 and cfg.train.weight_decay == 0.0005
    with pytest.raises(ConfigError, match="train.lr must be a number, got 'inf'"):
        config.load(None, ["train.lr=inf"])


def test_string_override_is_kept_verbatim():
    cfg = config.load(None, ["data.md5=12345678901234567890123456789012", "train.out_dir=1e5"])
    assert cfg.data.md5 == "12345678901234567890123456789012" and cfg.train.out_dir == "1e5"


def test_dump_round_trips(tmp_path):
    cfg = config.load(None, ["train.epochs=3", "model.width=8", "data.test_subset=10"])
    config.dump(cfg, tmp_path / "config.yaml")
    assert config.load(str(tmp_path / "config.yaml")) == cfg


@pytest.mark.parametrize("overrides,message", [
    (["train.epochz=3"], "unknown key train.epochz — did you mean train.epochs?"),
    (["trian.epochs=3"], "unknown key trian — did you mean train?"),
    (["model.widht=8"], "unknown key model.widht — did you mean model.width?"),
    (["train.epochs=ten"], "train.epochs must be an integer, got 'ten'"),
    (["train.epochs=2.5"], "train.epochs must be an integer, got 2.5"),
    (["train.lr=fast"], "train.lr must be a number, got 'fast'"),
    (["data.download=maybe"], "data.download must be a boolean, got 'maybe'"),
    (["train.lr=0"], "train.lr must be > 0, got 0.0"),
    (["train.lr=-1"], "train.lr must be > 0, got -1.0"),
    (["train.epochs=0"], "train.epochs must be >= 1, got 0"),
    (["data.val_size=50000"], "data.val_size must be in [0, 50000), got 50000"),
    (["data.source=imagenet"], "data.source must be cifar10 or synthetic, got 'imagenet'"),
    (["model.depth=50"], "model.depth must be 18 or 34, got 50"),
    (["train.precision=fp8"], "train.precision must be auto, fp32, bf16 or fp16, got 'fp8'"),
    (["epochs=3"], "override 'epochs=3' must look like section.key=value"),
    (["train.epochs"], "override 'train.epochs' must look like section.key=value"),
])
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        config.load(None, overrides)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text,message", [
    ("train:\n  epochs: [1\n", "invalid YAML in {path} at line"),
    ("train:\n  epochz: 3\n", "unknown key train.epochz — did you mean train.epochs?"),
    ("- 1\n- 2\n", "{path} must be a mapping of sections"),
    ("train: 3\n", "train in {path} must be a mapping of keys"),
    ("train:\n  batch_size: '64'\n", "train.batch_size must be an integer, got '64'"),
])
def test_bad_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(str(path))
    assert str(e.value).startswith(message.format(path=path))


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        config.load("nope.yaml")


def test_empty_file_is_the_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert config.load(str(tmp_path / "empty.yaml")) == Config()


@pytest.mark.parametrize("args,message", [
    (["train.epochz=1"], "error: unknown key train.epochz — did you mean train.epochs?"),
    (["--config", "missing.yaml"], "error: config file not found: missing.yaml"),
    (["train.lr=-0.1"], "error: train.lr must be > 0, got -0.1"),
])
def test_cli_prints_one_line_and_exits_non_zero(tmp_path, args, message):
    result = run_job([*args, f"train.out_dir={tmp_path / 'out'}"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == message
    assert not (tmp_path / "out").exists()  # failed before any work


def test_print_config_shows_the_resolved_config(tmp_path):
    result = run_job(["--print-config", "train.epochs=4"], cwd=tmp_path)
    assert result.returncode == 0
    assert yaml.safe_load(result.stdout)["train"]["epochs"] == 4
