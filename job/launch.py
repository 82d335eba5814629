"""What a launch must fit before anything is read or written: the batch against the world size and the data, SyncBN
against the device. job.train runs these at its start and job.preflight runs them before a job is submitted."""

from job.config import Config, ConfigError
from job.distributed import Runtime


def check_launch(cfg: Config, runtime: Runtime) -> None:
    """What a launch must fit before anything is read or written (job.preflight runs it too)."""
    t = cfg.train
    if t.batch_size % runtime.world_size:
        raise ConfigError(f"train.batch_size {t.batch_size} is not divisible by the world size {runtime.world_size}")
    use_sync_bn(t.sync_bn, t.batch_size // runtime.world_size, runtime)  # refuses true on the CPU, now


def steps_per_epoch(cfg: Config, runtime: Runtime, train_images: int) -> int:
    """Optimizer steps in one epoch (DistributedSampler drops the remainder); refuses a batch larger than the set."""
    per_rank = cfg.train.batch_size // runtime.world_size
    steps = train_images // runtime.world_size // per_rank
    if steps == 0:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} is larger than the training set "
                          f"({train_images} images)")
    return steps


def use_sync_bn(setting: str | bool, per_rank_batch: int, runtime: Runtime) -> bool:
    """train.sync_bn: auto turns SyncBatchNorm on where it matters (several CUDA ranks, under 32 images each)."""
    if setting == "auto":
        return runtime.device.type == "cuda" and runtime.world_size > 1 and per_rank_batch < 32
    if setting and runtime.device.type != "cuda":
        raise ConfigError("train.sync_bn=true needs CUDA: PyTorch's SyncBatchNorm has no CPU implementation "
                          "(use auto or false)")
    return bool(setting)
