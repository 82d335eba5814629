"""Config: defaults, YAML, overrides, and one clear line for every mistake, before any work."""

import dataclasses
import os
import signal
import typing

import pytest
import yaml

from job import config, mlflow_env, train
from job.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig
from job.preemption import StopSignal
from tests.conftest import run_job


def test_defaults_are_the_dataclasses():
    cfg = config.load()
    assert cfg == Config()
    assert (cfg.model.depth, cfg.model.width, cfg.model.reduction) == (18, 64, 16)
    assert cfg.train.resume == "auto" and cfg.data.source == "cifar10"
    assert cfg.train.stop_signals == ["SIGTERM", "SIGUSR1", "SIGINT"]


def test_yaml_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  lr: 0.2\n  seed: 3\ndata:\n  train_subset: 100\n  source: synthetic\n")
    cfg = config.load(str(path), ["train.epochs=9", "data.train_subset=null", "train.lr=1"])
    assert cfg.train.epochs == 9 and cfg.data.train_subset is None
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.seed == 3 and cfg.data.source == "synthetic"  # the file over the defaults
    assert cfg.train.batch_size == TrainConfig().batch_size and cfg.model == ModelConfig()  # untouched defaults


@pytest.mark.parametrize("override,key,value", [
    ("data.download=true", "download", True),
    ("data.verify=false", "verify", False),
    ("data.verify=no", "verify", False),  # YAML 1.1
])
def test_booleans(override, key, value):
    assert getattr(config.load(None, [override]).data, key) is value


@pytest.mark.parametrize("override,message", [
    ("data.download=1", "data.download must be a boolean, got 1"),
    ("train.epochs=true", "train.epochs must be an integer, got True"),
    ("train.lr=true", "train.lr must be a number, got True"),
    ("model.depth=18.0", "model.depth must be 18 or 34, got 18.0"),
    ("model.depth=true", "model.depth must be 18 or 34, got True"),
])
def test_no_silent_casts_between_bool_int_and_float(override, message):
    with pytest.raises(ConfigError) as e:
        config.load(None, [override])
    assert str(e.value) == message


@pytest.mark.parametrize("source", ["override", "file"])
def test_a_yes_or_no_for_a_choice_is_named_as_typed_or_as_yaml_read_it(source, tmp_path):
    """YAML 1.1 reads yes/no/on/off as booleans: an override of string choices keeps the text as typed (padding
    stripped), and a file's boolean says why it became one."""
    if source == "override":
        assert config.load(None, ["data.flip= alternate "]).data.flip == "alternate"
        assert config.load(None, ['data.flip="none"']).data.flip == "none"  # quoted: YAML's string
        args, expected = (None, ["data.flip=yes"]), "data.flip must be random, alternate or none, got 'yes'"
    else:
        (tmp_path / "c.yaml").write_text("data:\n  flip: no\n")
        args, expected = (str(tmp_path / "c.yaml"), []), ("data.flip must be random, alternate or none, got False "
                                                          "(YAML reads yes/no/on/off as booleans)")
    with pytest.raises(ConfigError) as e:
        config.load(*args)
    assert str(e.value) == expected
    assert config.load(None, ["train.sync_bn=true"]).train.sync_bn is True  # choices with booleans read YAML


CHOICES = [(f"{section.name}.{f.name}", typing.get_args(f.type))
           for section in dataclasses.fields(Config) for f in dataclasses.fields(section.type)
           if typing.get_origin(f.type) is typing.Literal]


def test_the_choice_fields_are_literals():
    assert {key for key, _ in CHOICES} == {"model.depth", "data.source", "train.schedule", "train.precision",
                                          "train.grad_compression", "train.device", "train.tta", "train.sync_bn",
                                          "train.profile_ranks", "data.pad_mode", "data.flip", "train.ema_mode"}


@pytest.mark.parametrize("key,options", CHOICES, ids=[key for key, _ in CHOICES])
def test_choices_come_from_the_literal(key, options):
    section, name = key.split(".")
    needs = ["train.ema_decay=0.9"] if key == "train.ema_mode" else []  # lookahead alone would do nothing
    for option in options:
        assert getattr(getattr(config.load(None, [f"{key}={option}", *needs]), section), name) == option
    names = [str(o).lower() if isinstance(o, bool) else str(o) for o in options]  # as YAML writes true/false
    listed = ", ".join(names[:-1]) + f" or {names[-1]}"
    with pytest.raises(ConfigError) as e:
        config.load(None, [f"{key}=nope"])
    assert str(e.value) == f"{key} must be {listed}, got 'nope'"


def test_direct_construction_is_checked_too():
    with pytest.raises(ConfigError, match="^train.device must be auto, cuda or cpu, got 'gpu'$"):
        TrainConfig(device="gpu")
    with pytest.raises(ConfigError, match="^data.source must be cifar10 or synthetic, got 'imagenet'$"):
        DataConfig(source="imagenet")
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)
    assert TrainConfig(stop_signals="SIGUSR2").stop_signals == ["SIGUSR2"]


@pytest.mark.parametrize("override,signals", [
    ("train.stop_signals=[SIGTERM,SIGUSR1]", ["SIGTERM", "SIGUSR1"]),
    ("train.stop_signals=[SIGUSR2]", ["SIGUSR2"]),
    ("train.stop_signals=SIGTERM,SIGUSR2", ["SIGTERM", "SIGUSR2"]),  # the older comma-separated form
    ("train.stop_signals= SIGHUP , SIGINT ", ["SIGHUP", "SIGINT"]),
    ("train.stop_signals=SIGUSR1", ["SIGUSR1"]),
    ("train.stop_signals=[]", []),
    ("train.stop_signals=", []),
])
def test_stop_signals_override(override, signals):
    assert config.load(None, [override]).train.stop_signals == signals


@pytest.mark.parametrize("text,signals", [
    ("train:\n  stop_signals: [SIGUSR2, SIGTERM]\n", ["SIGUSR2", "SIGTERM"]),
    ("train:\n  stop_signals:\n  - SIGINT\n", ["SIGINT"]),
    ("train:\n  stop_signals: SIGTERM,SIGUSR1\n", ["SIGTERM", "SIGUSR1"]),
    ("train:\n  stop_signals: []\n", []),
])
def test_stop_signals_in_a_file(tmp_path, text, signals):
    (tmp_path / "c.yaml").write_text(text)
    assert config.load(str(tmp_path / "c.yaml")).train.stop_signals == signals


@pytest.mark.parametrize("override,message", [
    ("train.stop_signals=SIGTERM,SIGKILL",
     "train.stop_signals[1] must be SIGTERM, SIGUSR1, SIGUSR2, SIGINT or SIGHUP, got 'SIGKILL'"),
    ("train.stop_signals=[term]",
     "train.stop_signals[0] must be SIGTERM, SIGUSR1, SIGUSR2, SIGINT or SIGHUP, got 'term'"),
    ("train.stop_signals=15", "train.stop_signals must be a list or a comma-separated string, got 15"),
])
def test_bad_stop_signals(override, message):
    with pytest.raises(ConfigError) as e:
        config.load(None, [override])
    assert str(e.value) == message


def test_stop_signals_from_the_config_install_handlers():
    def ignore(signum, frame):
        pass

    before = signal.signal(signal.SIGUSR2, ignore)  # a signal no handler takes is ignored, not fatal
    try:
        StopSignal(config.load(None, ["train.stop_signals=[]"]).train.stop_signals, "gloo")
        assert signal.getsignal(signal.SIGUSR2) is ignore
        stop = StopSignal(config.load(None, ["train.stop_signals=SIGUSR2"]).train.stop_signals, "gloo")
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.received == "SIGUSR2"
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_exponent_without_a_dot_is_a_number(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  weight_decay: 5e-4\n")
    cfg = config.load(str(tmp_path / "c.yaml"), ["train.lr=1e-3"])
    assert cfg.train.lr == 0.001 and cfg.train.weight_decay == 0.0005
    with pytest.raises(ConfigError, match="train.lr must be a finite number no larger than 1e30, got inf"):
        config.load(None, ["train.lr=inf"])


def test_string_override_is_kept_verbatim():
    cfg = config.load(None, ["data.md5=12345678901234567890123456789012", "train.out_dir=1e5"])
    assert cfg.data.md5 == "12345678901234567890123456789012" and cfg.train.out_dir == "1e5"


def test_dump_round_trips(tmp_path):
    cfg = config.load(None, ["train.epochs=3", "model.width=8", "data.test_subset=10", "model.depth=34",
                             "train.precision=bf16", "train.stop_signals=SIGUSR2,SIGHUP", "data.download=true",
                             "train.lr=1e-3", "data.md5=12345678901234567890123456789012"])
    config.dump(cfg, tmp_path / "config.yaml")
    assert config.load(str(tmp_path / "config.yaml")) == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["stop_signals"] == ["SIGUSR2", "SIGHUP"]


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
    (["train.lr=.inf"], "error: train.lr must be a finite number no larger than 1e30, got inf"),
    (["train.lr=.nan"], "error: train.lr must be a finite number no larger than 1e30, got nan"),
    (["train.lr=1e31"], "error: train.lr must be a finite number no larger than 1e30, got 1e+31"),
    (["train.seed=99999999999999999999"], "error: train.seed must be below 2**31 in magnitude, got 99999999999999999999"),
    (["--config", "false.yaml"], "error: false.yaml must be a mapping of sections (model, data, train, mlflow), "
                                 "got bool 'False'"),
    (["--config", "list.yaml"], "error: list.yaml must be a mapping of sections (model, data, train, mlflow), "
                                "got list \"['train', 'epochs']\""),
    (["--config", "latin1.yaml"], "error: config file latin1.yaml is not UTF-8 text (byte 3): is it the YAML file?"),
])
def test_cli_prints_one_line_and_exits_non_zero(tmp_path, monkeypatch, capsys, args, message):
    """job.train's main() in this process: a config mistake returns before anything is imported, started or
    written (the test below shows the same through a real process)."""
    (tmp_path / "false.yaml").write_text("false\n")  # once meant "all defaults": a 200-epoch run
    (tmp_path / "list.yaml").write_text("- train\n- epochs\n")
    (tmp_path / "latin1.yaml").write_bytes("# réglages\ntrain:\n  epochs: 3\n".encode("latin-1"))
    monkeypatch.chdir(tmp_path)
    main = train.main.__wrapped__  # without @record, which would set up torchrun's fault handler on pytest's capture
    assert main([*args, f"train.out_dir={tmp_path / 'out'}"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == message and not captured.out
    assert not (tmp_path / "out").exists()  # failed before any work


def test_a_config_mistake_ends_the_process_with_one_line_and_exit_2(tmp_path):
    result = run_job(["--config", "missing.yaml", "train.epochz=1", f"train.out_dir={tmp_path / 'out'}"],
                     cwd=tmp_path)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "error: config file not found: missing.yaml\n"
    assert not (tmp_path / "out").exists()


def test_a_tilde_in_a_path_means_the_home_directory():
    cfg = config.load(overrides=["train.out_dir=~/runs/a", "data.root=~/data", "train.resume=~/ckpt/last.pt"])
    home = os.path.expanduser("~")
    assert (cfg.train.out_dir, cfg.data.root, cfg.train.resume) == (f"{home}/runs/a", f"{home}/data",
                                                                     f"{home}/ckpt/last.pt")
    assert config.load(overrides=["train.resume=auto"]).train.resume == "auto"


def test_a_token_in_the_tracking_uri_is_refused_and_redacted():
    assert mlflow_env.redact("postgresql://mlflow@db:5432/mlflow") == "postgresql://mlflow@db:5432/mlflow"  # a user
    for uri, shown in [("https://dapi123abc@mlflow.example.com", "https://***@mlflow.example.com"),
                       ("https://mlflow.example.com/?token=abc&x=1", "https://mlflow.example.com/?token=***&x=1")]:
        with pytest.raises(ConfigError) as info:
            config.load(overrides=[f"mlflow.tracking_uri={uri}"])
        assert shown in str(info.value) and "abc" not in str(info.value)


def test_print_config_shows_the_resolved_config(tmp_path):
    overrides = ["train.epochs=4", "train.stop_signals=[SIGUSR2]"]
    result = run_job(["--print-config", *overrides], cwd=tmp_path)
    assert result.returncode == 0
    assert yaml.safe_load(result.stdout)["train"]["epochs"] == 4
    (tmp_path / "printed.yaml").write_text(result.stdout)
    assert config.load(str(tmp_path / "printed.yaml")) == config.load(None, overrides)


def test_yaml_nested_deeper_than_python_recurses_is_one_line(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("train: " + "[" * 5000)
    with pytest.raises(ConfigError) as e:
        config.load(str(deep))
    assert str(e.value) == f"{deep} is nested too deeply to be a config (thousands of levels)"
    with pytest.raises(ConfigError, match=r"^train.epochs must be an integer, got '\[\[\[.*\.\.\.\[+'$"):
        config.load(None, ["train.epochs=" + "[" * 5000])  # an override not YAML is its text, checked as such


# ---- each key's role, declared on the key ----------------------------------------------------------------------

def test_every_key_declares_one_of_the_roles():
    roles = config.roles()
    assert set(roles) == {f"{s}.{f.name}" for s in ("model", "data", "train", "mlflow")
                          for f in dataclasses.fields(getattr(Config(), s))}
    assert set(roles.values()) == {config.RECIPE, config.APPLIES, config.SEED, config.SPEED, config.LAUNCH}
    assert {k for k, r in roles.items() if r == config.SEED} == {"train.seed"}
    assert all(r == config.LAUNCH for k, r in roles.items() if k.startswith("mlflow."))


def test_a_key_without_a_role_is_recipe_and_these_are_all():
    """A field without role(...) is RECIPE (a resume refuses to change it): a new key lands here and fails this test
    until its author says whether it shapes what is trained or only how, where or how fast it runs."""
    assert sorted(k for k, r in config.roles().items() if r == config.RECIPE) == [
        "data.source", "data.train_subset", "data.val_size", "model.bn_momentum", "model.depth", "model.reduction",
        "model.width", "model.zero_init_residual", "train.batch_size", "train.bn_bias_lr_mult", "train.ema_decay",
        "train.ema_every_steps", "train.ema_mode", "train.lr", "train.momentum", "train.ref_batch_size",
        "train.schedule", "train.warmup_epochs", "train.weight_decay", "train.whiten_stem"]


@pytest.mark.parametrize("key", sorted(config.roles()))
def test_a_keys_role_decides_the_hashes_and_the_resume(key):
    """Changing one key changes config_hash unless it is LAUNCH, the report's recipe unless it is LAUNCH or SEED,
    and a resume applies it (APPLIES), refuses it (RECIPE, SEED) or takes it silently (SPEED, LAUNCH)."""
    from job import provenance, resume

    role, cfg = config.roles()[key], Config()
    changed = {**cfg.flat(), key: "another value"}
    assert (provenance.recipe_hash(changed) == provenance.config_hash(cfg)) == (role == config.LAUNCH)
    assert (provenance.recipe_hash(changed, seed=False) == provenance.recipe_hash(cfg.flat(), seed=False)) == (
        role in (config.LAUNCH, config.SEED))
    saved = cfg.to_dict()
    section, name = key.split(".")
    saved[section][name] = "another value"
    applies, refused = resume.config_changes(saved, cfg)
    expected = {config.APPLIES: ([key], []), config.RECIPE: ([], [key]), config.SEED: ([], [key])}.get(role, ([], []))
    assert ([c.split()[0] for c in applies], [c.split()[0] for c in refused]) == expected


def test_the_recipe_hash_of_a_config_and_of_its_mlflow_params_is_one():
    """The report groups MLflow runs by the hash job.train tags them with (its params are the config's, as strings)."""
    from job import provenance, report

    cfg = config.load(overrides=["train.seed=3", "train.out_dir=/elsewhere", "train.lr=0.2"])
    params = {key: str(value) for key, value in cfg.flat().items()}
    assert provenance.recipe_hash(params) == provenance.config_hash(cfg)
    assert report.recipe_of(params)[0] == provenance.recipe_hash(Config(train=TrainConfig(lr=0.2)).flat(), seed=False)
