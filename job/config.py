"""The job's configuration: typed dataclasses (the one source of defaults), each key's role declared on the key,
and load(): defaults, then a YAML file, then key=value overrides (job/configfile.py reads their text safely).

Every check lives here and runs before any work starts; a bad value raises ConfigError with one line
that names the key.
"""

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from job import configfile
from job.configfile import show
from job.mlflow_env import password_problem


class ConfigError(ValueError):
    """A configuration mistake; its message is one line meant for the user."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message if len(message) <= 300 else message[:297] + "...")  # a value may be any length


def _check_types(section: object, name: str) -> None:
    """Coerce and check every field of a section against its annotation (so direct construction is checked too)."""
    for f in dataclasses.fields(section):
        setattr(section, f.name, _coerce(f"{name}.{f.name}", getattr(section, f.name), f.type))


# A key's role, declared on the key (field metadata); the recipe hash, the report and the resume rules read it:
RECIPE = "recipe"    # shapes what is trained: in the recipe; a resume refuses a change (its weights were made with it)
APPLIES = "applies"  # in the recipe; a resume may change it, from its first step on (the change is named in a line)
SEED = "seed"        # which of several runs of a recipe: in config_hash, refused on resume, not in the report's recipe
SPEED = "speed"      # how fast the same training runs (layout, compilation, device): in config_hash; resume may change
LAUNCH = "launch"    # where outputs go, how a launch is chunked, watched or tracked: in no hash; resume may change


def role(kind: str, default=dataclasses.MISSING, *, factory=dataclasses.MISSING):
    """A field of the role kind (a field without one is RECIPE)."""
    return field(default=default, default_factory=factory, metadata={"role": kind})


Signal = typing.Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP"]


@dataclass(kw_only=True)
class ModelConfig:
    depth: typing.Literal[18, 34] = 18
    """SENet depth: 18 (blocks 2,2,2,2) or 34 (3,4,6,3)."""
    width: int = 64
    """Channels of the stem and first stage; later stages use 2x, 4x, 8x."""
    reduction: int = 16
    """Squeeze-and-excitation reduction ratio."""
    bn_momentum: float = 0.1
    """BatchNorm momentum in torch's sense: the weight of each new batch in the running statistics."""
    zero_init_residual: bool = False
    """Start each block's last BatchNorm scale at 0, so each block starts as its shortcut (torchvision's name)."""

    def __post_init__(self):
        _check_types(self, "model")
        _require(self.width >= 1, f"model.width must be >= 1, got {self.width}")
        _require(self.reduction >= 1, f"model.reduction must be >= 1, got {self.reduction}")
        _require(0 < self.bn_momentum <= 1, f"model.bn_momentum must be in (0, 1], got {self.bn_momentum}")


@dataclass(kw_only=True)
class DataConfig:
    source: typing.Literal["cifar10", "synthetic"] = "cifar10"
    """cifar10 (files under root) or synthetic (a generated, learnable stand-in of the same shapes)."""
    root: str = role(APPLIES, "data")
    """Directory that holds (or will hold) cifar-10-batches-py/."""
    download: bool = role(APPLIES, False)
    """Download CIFAR-10 into root if missing (local rank 0 of each node; the others wait)."""
    verify: bool = role(APPLIES, True)
    """Check the md5 of each standard CIFAR-10 file; false accepts a re-encoded copy."""
    url: str = role(APPLIES, "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")
    """Where to download the archive from (a local mirror, say)."""
    md5: str = role(APPLIES, "c58f30108f718f92721af3b95e74349a")
    """md5 of the archive at url."""
    val_size: int = 5000
    """Training images held out for validation (a fixed split, taken first); 0 = no validation."""
    train_subset: int | None = None
    """Train on a fixed random N of the images left after the validation split (quick runs)."""
    test_subset: int | None = role(APPLIES, None)
    """Test on a fixed random N of the test images, the same in every run (quick runs)."""
    crop_padding: int = role(APPLIES, 4)
    """Random translation: a 32x32 crop of the image padded by this many pixels on each side; 0 = off."""
    pad_mode: typing.Literal["zeros", "reflect"] = role(APPLIES, "zeros")
    """How the crop's padding is filled: zeros (black borders) or reflect (the image mirrored at its edges)."""
    flip: typing.Literal["random", "alternate", "none"] = role(APPLIES, "random")
    """Horizontal flips in training: random (each image, each epoch, p=0.5), alternate (each image flipped on every
    other epoch, its first epoch's side random: every image seen both ways in each pair of epochs) or none."""
    cutout: int = role(APPLIES, 0)
    """Side of a square cut out of each training image (filled with the dataset mean); 0 = off."""
    mixup_alpha: float = role(APPLIES, 0.0)
    """MixUp on each device batch (torchvision.transforms.v2.MixUp), Beta(alpha, alpha); 0 = off."""
    cutmix_alpha: float = role(APPLIES, 0.0)
    """CutMix on each device batch (v2.CutMix); 0 = off; with mixup_alpha too, one of the two per batch."""

    def __post_init__(self):
        _check_types(self, "data")
        self.root = os.path.expanduser(self.root)
        _require(0 <= self.val_size < 50000, f"data.val_size must be in [0, 50000), got {self.val_size}")
        for key in ("train_subset", "test_subset"):
            value = getattr(self, key)
            _require(value is None or value >= 1, f"data.{key} must be >= 1 or null, got {value}")
        _require(0 <= self.cutout <= 32, f"data.cutout must be in [0, 32], got {self.cutout}")
        _require(0 <= self.crop_padding <= 16, f"data.crop_padding must be in [0, 16], got {self.crop_padding}")
        _require(self.crop_padding or self.pad_mode == "zeros",
                 f"data.pad_mode={self.pad_mode} does nothing with data.crop_padding=0 (no translation, no padding)")
        for key in ("mixup_alpha", "cutmix_alpha"):
            value = getattr(self, key)
            _require(0 <= value <= 10, f"data.{key} must be in [0, 10] (0 = off), got {value}")


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = role(APPLIES, 200)
    """Passes over the training set."""
    batch_size: int = 512
    """Global batch size, split evenly over the ranks."""
    lr: float = 0.1
    """Peak learning rate at ref_batch_size; the job scales it linearly to batch_size."""
    ref_batch_size: int = 128
    """The batch size that lr is stated for."""
    momentum: float = 0.9
    """SGD (Nesterov) momentum."""
    weight_decay: float = 5e-4
    """L2 penalty on conv and linear weights (not on BatchNorm or biases)."""
    label_smoothing: float = role(APPLIES, 0.1)
    """Label smoothing of the training loss."""
    ema_decay: float = 0.0
    """Weight averaging (0 = off). ema_mode=average: an EMA of the weights and BatchNorm buffers, its decay warmed up
    as min(decay, (1 + n) / (10 + n)) over its n updates; validation, test, best.pt's `ema` and the registered model
    use the averaged weights. ema_mode=lookahead: the decay per step of airbench's Lookahead (below)."""
    ema_mode: typing.Literal["average", "lookahead"] = "average"
    """average (a separate averaged copy), or lookahead: every ema_every_steps steps the slow weights move toward
    the trained ones by 1 - rho, rho = ema_decay**ema_every_steps * progress**3, and the trained ones are set to
    them (again at each epoch's end)."""
    ema_every_steps: int = 1
    """Update the average every this many optimizer steps (airbench's Lookahead: 5)."""
    bn_bias_lr_mult: float = 1.0
    """Learning-rate multiplier of the BatchNorm biases (airbench trains them 64x faster; weight decay unchanged)."""
    whiten_stem: bool = False
    """Initialise conv1 from the whitening of the training images' 3x3 patches (first 5,000 images) instead of
    at random; training then moves it as any other layer."""
    tta: typing.Literal["none", "flip", "multicrop"] = role(APPLIES, "flip")
    """Test-time augmentation in validation, test and the registered model: flip averages the logits of the image
    and its mirror (+0.7 points at width 32, 3 seeds: BENCHMARKS.md); multicrop adds the pairs shifted one pixel
    up-left and down-right (weights 1/2, 1/4, 1/4; 6 forward passes)."""
    sync_bn: typing.Literal["auto", True, False] = role(APPLIES, "auto")
    """SyncBatchNorm across ranks (CUDA only): auto turns it on when a rank's batch is below 32 images."""
    clip_grad_norm: float = role(APPLIES, 0.0)
    """Clip the global gradient norm to this (0 = off)."""
    schedule: typing.Literal["cosine", "onecycle"] = "cosine"
    """After warmup: cosine (to 0) or onecycle (linear to 0)."""
    warmup_epochs: float = 5.0
    """Epochs of linear warmup from 0 to the peak learning rate."""
    seed: int = role(SEED, 0)
    """Seeds the model init, the data order and the augmentation."""
    precision: typing.Literal["auto", "fp32", "bf16", "fp16"] = role(APPLIES, "auto")
    """auto (bf16 on CUDA and on CPUs with native bf16, else fp32), fp32, bf16 (autocast) or fp16 (+ scaler)."""
    channels_last: bool = role(SPEED, True)
    """Use the channels_last memory format for the model and the batches (faster on CPU and GPU here)."""
    compile: bool = role(SPEED, False)
    """Compile the model with torch.compile."""
    threads: int = role(LAUNCH, 0)
    """Intra-op CPU threads per process; 0 = the CPUs this process may use, divided by the local ranks."""
    reuse_host_memory: bool = role(SPEED, True)
    """glibc keeps freed host memory for the next step instead of unmapping it (no page faults per step)."""
    step_times: bool = role(LAUNCH, False)
    """Write every optimizer step's duration to <out_dir>/steps.jsonl (benchmarks; no host sync on CUDA)."""
    grad_compression: typing.Literal["none", "bf16"] = role(SPEED, "none")
    """none, or bf16: DDP all-reduces gradients in bfloat16 (half the bytes; torch's bf16_compress_hook)."""
    bucket_mb: int = role(SPEED, 25)
    """DDP gradient bucket size in MiB."""
    device: typing.Literal["auto", "cuda", "cpu"] = role(SPEED, "auto")
    """auto (CUDA if present, else CPU), cuda or cpu."""
    eval_batch_size: int = role(APPLIES, 1024)
    """Per-rank batch size for validation and test."""
    out_dir: str = role(LAUNCH, "runs/senet")
    """Where config.yaml, metrics.jsonl and checkpoints/ go."""
    resume: str = role(LAUNCH, "auto")
    """auto (continue from out_dir's last.pt if there is one), never, or a checkpoint path."""
    stop_after_epochs: int | None = role(LAUNCH, None)
    """Stop cleanly after this many epochs in this launch (walltime-limited allocations); resume continues."""
    timeout_s: int = role(LAUNCH, 600)
    """Timeout of collective operations, seconds."""
    checkpoint_every_steps: int = role(LAUNCH, 0)
    """Also write last.pt every N optimizer steps inside an epoch (0 = at epoch ends only)."""
    deterministic: bool = role(LAUNCH, False)
    """CUDA: deterministic kernels (torch.use_deterministic_algorithms, no cuDNN autotuning, a fixed cuBLAS
    workspace) so that a resume is bitwise equal to an uninterrupted run; slower. The CPU is deterministic."""
    checkpoint_every_epochs: int = role(LAUNCH, 1)
    """Write last.pt every N epochs (and at an epoch with the best validation accuracy, the last epoch and a stop)."""
    stop_signals: list[Signal] = role(LAUNCH, factory=lambda: ["SIGTERM", "SIGUSR1", "SIGINT"])
    """Signals that make all ranks stop at the next step, checkpoint, and exit 143 (resumable); [] = none."""
    log_every_s: float = role(LAUNCH, 30.0)
    """Where stdout is not a terminal (batch logs), rank 0 prints a progress line at most this often (0 = off)."""
    log_every_steps: int = role(LAUNCH, 0)
    """Also print that line every this many steps (0 = off); a line reads the device's running sums (a host
    sync) only then."""
    profile: bool = role(LAUNCH, False)
    """torch.profiler over profile_warmup + profile_active steps after profile_skip, into <out_dir>/profile/."""
    profile_skip: int = role(LAUNCH, 5)
    """Steps of this launch before the profiled window (start-up, cuDNN autotuning, compilation)."""
    profile_warmup: int = role(LAUNCH, 2)
    """Steps the profiler runs but discards (its own start-up)."""
    profile_active: int = role(LAUNCH, 5)
    """Steps recorded into the trace and the op table."""
    profile_ranks: typing.Literal["rank0", "all"] = role(LAUNCH, "rank0")
    """Profile rank 0 only, or every rank (each into <out_dir>/profile/rank<N>/)."""
    stop_check_every_steps: int = role(LAUNCH, 10)
    """Ask all ranks about stop signals every this many steps (and at each epoch's end): one all-reduce per check,
    whose answer is read at the next one, so a stop comes within 2x this many steps of the signal."""

    @property
    def resume_file(self) -> str | None:
        """The checkpoint train.resume names, or None for the policies auto and never."""
        return None if self.resume in ("auto", "never") else self.resume

    def __post_init__(self):
        _check_types(self, "train")
        self.out_dir = os.path.expanduser(self.out_dir)  # `~/runs` means the home directory, not a folder named ~
        if self.resume_file:
            self.resume = os.path.expanduser(self.resume)
        _require(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        _require(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _require(self.ref_batch_size >= 1, f"train.ref_batch_size must be >= 1, got {self.ref_batch_size}")
        _require(self.eval_batch_size >= 1, f"train.eval_batch_size must be >= 1, got {self.eval_batch_size}")
        _require(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _require(0 <= self.momentum < 1, f"train.momentum must be in [0, 1), got {self.momentum}")
        _require(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _require(0 <= self.label_smoothing < 1,
                 f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _require(self.warmup_epochs >= 0, f"train.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        _require(0 <= self.ema_decay < 1, f"train.ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        _require(self.ema_every_steps >= 1, f"train.ema_every_steps must be >= 1, got {self.ema_every_steps}")
        _require(self.ema_decay or (self.ema_mode == "average" and self.ema_every_steps == 1),
                 f"train.ema_mode={self.ema_mode} / ema_every_steps={self.ema_every_steps} do nothing while "
                 f"train.ema_decay is 0 (off): set train.ema_decay too (airbench's Lookahead: 0.95)")
        _require(self.bn_bias_lr_mult > 0, f"train.bn_bias_lr_mult must be > 0, got {self.bn_bias_lr_mult}")
        _require(self.clip_grad_norm >= 0, f"train.clip_grad_norm must be >= 0 (0 = off), got {self.clip_grad_norm}")
        _require(self.threads >= 0, f"train.threads must be >= 0, got {self.threads}")
        _require(self.bucket_mb >= 1, f"train.bucket_mb must be >= 1, got {self.bucket_mb}")
        _require(bool(self.out_dir), "train.out_dir must not be empty")
        _require(bool(self.resume), "train.resume must be auto, never or a checkpoint path")
        _require(self.stop_after_epochs is None or self.stop_after_epochs >= 1,
                 f"train.stop_after_epochs must be >= 1 or null, got {self.stop_after_epochs}")
        _require(self.timeout_s >= 1, f"train.timeout_s must be >= 1, got {self.timeout_s}")
        _require(self.checkpoint_every_epochs >= 1,
                 f"train.checkpoint_every_epochs must be >= 1, got {self.checkpoint_every_epochs}")
        _require(self.checkpoint_every_steps >= 0,
                 f"train.checkpoint_every_steps must be >= 0, got {self.checkpoint_every_steps}")
        _require(self.log_every_s >= 0, f"train.log_every_s must be >= 0 (0 = off), got {self.log_every_s}")
        _require(self.log_every_steps >= 0, f"train.log_every_steps must be >= 0 (0 = off), got {self.log_every_steps}")
        _require(self.profile_skip >= 0 and self.profile_warmup >= 0 and self.profile_active >= 1,
                 f"train.profile_skip and profile_warmup must be >= 0 and profile_active >= 1, got "
                 f"{self.profile_skip}, {self.profile_warmup}, {self.profile_active}")
        _require(self.stop_check_every_steps >= 1,
                 f"train.stop_check_every_steps must be >= 1, got {self.stop_check_every_steps}")


@dataclass(kw_only=True)
class MlflowConfig:
    enabled: bool = role(LAUNCH, True)
    """Track the run in MLflow (rank 0 only); false runs without mlflow installed."""
    tracking_uri: str = role(LAUNCH, "")
    """Tracking server or store; empty: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db."""
    experiment: str = role(LAUNCH, "senet-cifar10")
    """Experiment name."""
    run_name: str = role(LAUNCH, "")
    """Run name; empty lets MLflow pick one."""
    registered_model: str = role(LAUNCH, "senet18-cifar10")
    """Model registry name the trained model is registered under."""
    promote_margin: float = role(LAUNCH, 0.0)
    """@champion moves to a new version only if its val_acc beats the champion's by more than this."""
    required: bool = role(LAUNCH, True)
    """Fail at start if the tracking server is unreachable; false: warn and keep metrics.jsonl only."""
    flush_timeout_s: int = role(LAUNCH, 300)
    """At the end, how long to keep retrying an absent tracking server before giving up (warning)."""
    export_pt2: bool = role(LAUNCH, True)
    """Also log the registered model as a pickle-free torch.export program (extra_files/model.pt2: ~46 MB at
    full width, ~2.5 s at registration)."""
    log_every_steps: int = role(LAUNCH, 0)
    """Also log the running train loss/accuracy and images/s at a step axis every this many steps (0 = off;
    best effort: a step metric the server misses is not retried; each is a request rank 0 waits for)."""

    def __post_init__(self):
        _check_types(self, "mlflow")
        _require(bool(self.experiment), "mlflow.experiment must not be empty")
        name = self.registered_model  # MLflow's own rules, checked before training rather than at registration
        _require(bool(name.strip()) and name.strip() == name and not set("/:'\"") & set(name)
                 and name not in (".", "..") and len(name) <= 250,
                 f"mlflow.registered_model {name!r} is not a name MLflow accepts (non-empty, no '/', ':' or "
                 f"quotes, no surrounding spaces, at most 250 characters)")
        password = password_problem(self.tracking_uri, "mlflow.tracking_uri")
        _require(password is None, password or "")
        _require(self.promote_margin >= 0, f"mlflow.promote_margin must be >= 0, got {self.promote_margin}")
        _require(self.flush_timeout_s >= 0, f"mlflow.flush_timeout_s must be >= 0, got {self.flush_timeout_s}")
        _require(self.log_every_steps >= 0,
                 f"mlflow.log_every_steps must be >= 0 (0 = off), got {self.log_every_steps}")


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def to_dict(self) -> dict:
        """Nested plain dict (for YAML and checkpoints)."""
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, object]:
        """{"train.lr": 0.1, ...}: every key by its full name (MLflow's params, the recipe hash)."""
        return {f"{section}.{key}": value
                for section, values in self.to_dict().items() for key, value in values.items()}


def roles() -> dict[str, str]:
    """Every key's role: {"train.lr": RECIPE, "train.out_dir": LAUNCH, ...} (see role())."""
    return {f"{name}.{f.name}": f.metadata.get("role", RECIPE)
            for name, cls in _sections().items() for f in dataclasses.fields(cls)}


def _sections() -> dict[str, type]:
    return {f.name: f.type for f in dataclasses.fields(Config)}


def _all_keys() -> list[str]:
    return [f"{name}.{f.name}" for name, cls in _sections().items() for f in dataclasses.fields(cls)]


def _unknown(key: str) -> ConfigError:
    match = difflib.get_close_matches(key, _all_keys() + list(_sections()), n=1, cutoff=0.6)
    hint = f" — did you mean {match[0]}?" if match else f" — valid sections: {', '.join(_sections())}"
    return ConfigError(f"unknown key {key}{hint}")


def _one_of(options: tuple) -> str:
    """(a, b, c) -> 'a, b or c'"""
    *rest, last = (str(o).lower() if isinstance(o, bool) else str(o) for o in options)  # YAML's true, false
    return f"{', '.join(rest)} or {last}" if rest else last


def _finite(key: str, number: float) -> float:
    if not math.isfinite(number) or abs(number) > 1e30:  # inf trains to NaN; 1e300 overflows on the way
        raise ConfigError(f"{key} must be a finite number no larger than 1e30, got {number!r}")
    return number


def _coerce(key: str, value, annotation):
    """Check one value against its field type; ints are accepted where floats are expected."""
    if typing.get_origin(annotation) is typing.Literal:
        options = typing.get_args(annotation)
        if any(type(value) is type(option) and value == option for option in options):  # 1 is not True
            return value
        hint = (" (YAML reads yes/no/on/off as booleans)" if isinstance(value, bool)
                and all(isinstance(option, str) for option in options) else "")
        raise ConfigError(f"{key} must be {_one_of(options)}, got {show(value)}{hint}")
    if typing.get_origin(annotation) is list:
        if isinstance(value, str):  # the older form, "SIGTERM,SIGUSR1"
            value = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list or a comma-separated string, got {show(value)}")
        (item_type,) = typing.get_args(annotation)
        return [_coerce(f"{key}[{i}]", item, item_type) for i, item in enumerate(value)]
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= 2**31:  # every count, size and seed here fits; larger ones overflow torch or C
                raise ConfigError(f"{key} must be below 2**31 in magnitude, got {show(value)}")
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return _finite(key, float(value))
        if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                continue
            return _finite(key, number)
        if kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    names = " or ".join({bool: "a boolean", int: "an integer", float: "a number", str: "a string",
                         type(None): "null"}[k] for k in allowed)
    raise ConfigError(f"{key} must be {names}, got {show(value)}")


def _takes_text(annotation) -> bool:
    """Whether a key's choices are all strings, so that an override YAML reads as another type is taken as typed."""
    return (typing.get_origin(annotation) is typing.Literal
            and all(isinstance(option, str) for option in typing.get_args(annotation)))


def _merge(tree: dict, values: dict, origin: str, raw: str | None = None) -> None:
    """Merge a {section: {key: value}} mapping into tree, checking names (the dataclasses check the values).

    raw is an override's text as typed: a string field takes it verbatim (a hex md5 stays a string), and a key of
    string choices takes it, stripped, where YAML read another type (data.flip=yes is refused as 'yes', not True).
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{origin} must be a mapping of sections (model, data, train, mlflow)")
    sections = _sections()
    for section, entries in values.items():
        if section not in sections:
            raise _unknown(str(section))
        if not isinstance(entries, dict):
            raise ConfigError(f"{section} in {origin} must be a mapping of keys, got {show(entries)}")
        fields = {f.name: f for f in dataclasses.fields(sections[section])}
        for name, value in entries.items():
            key = f"{section}.{name}"
            if name not in fields:
                raise _unknown(key)
            if raw is not None and fields[name].type is str:
                value = raw
            elif raw is not None and _takes_text(fields[name].type) and not isinstance(value, str):
                value = raw.strip()  # data.flip=yes: YAML's True, but "yes" was typed ("random" keeps YAML's reading)
            tree[section][name] = value


def load(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file at path, then key=value overrides; checked as a whole."""
    tree = {name: {} for name in _sections()}
    try:
        if path is not None:
            _merge(tree, configfile.read(path) or {}, path)
        for text in overrides:
            section, name, value, raw = configfile.parse_override(text)
            _merge(tree, {section: {name: value}}, "override", raw)
    except configfile.Refused as e:
        raise ConfigError(str(e)) from None
    try:
        return Config(**{name: cls(**tree[name]) for name, cls in _sections().items()})
    except TypeError as e:  # a field the dataclass rejects; _merge should have caught it
        raise ConfigError(str(e)) from None


def dump(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML that load() reads back to the same Config."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
