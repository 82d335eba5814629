"""Where a run comes from: the source commit, a hash of the recipe, and the tags every MLflow run carries."""

import hashlib
import json
import os
import subprocess
from pathlib import Path

import torch

from job.config import Config
from job.distributed import Runtime

# train.* settings that say where outputs go or how a launch is chunked or watched, not what is trained
NOT_RECIPE = ("out_dir", "resume", "stop_after_epochs", "stop_signals", "timeout_s", "checkpoint_every_steps",
              "checkpoint_every_epochs", "deterministic", "step_times", "threads", "log_every_s", "log_every_steps",
              "profile", "profile_skip", "profile_warmup", "profile_active", "profile_ranks", "stop_check_every_steps")


def config_hash(cfg: Config) -> str:
    """Short hash of the settings that shape the model and its training (not where outputs go)."""
    tree = cfg.to_dict()
    tree["train"] = {k: v for k, v in tree["train"].items() if k not in NOT_RECIPE}
    tree.pop("mlflow")
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:12]


def git_commit(path: Path = Path(__file__).resolve().parent) -> tuple[str, bool | None] | None:
    """(commit, dirty) of the git checkout holding path; outside one (an installed package, a container), the
    commit an image was built from (SENET_GIT_COMMIT, the Dockerfile's GIT_COMMIT build arg) with dirty unknown;
    else None."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        baked = os.environ.get("SENET_GIT_COMMIT", "")
        return (baked, None) if baked and baked != "unknown" else None


def run_tags(cfg: Config, runtime: Runtime) -> dict[str, str]:
    """Versions, world size, device, recipe hash, commit, and the scheduler's ids where present."""
    rt = runtime
    device = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu"
    tags = {"torch": torch.__version__, "cuda": str(torch.version.cuda), "world_size": str(rt.world_size),
            "nodes": str(rt.num_nodes), "device": device, "config_hash": config_hash(cfg)}
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit[0]
        if commit[1] is not None:
            tags["git_dirty"] = str(commit[1]).lower()
    for env, tag in (("SLURM_JOB_ID", "slurm_job_id"), ("KUBERNETES_POD_NAME", "k8s_pod"),
                     ("HOSTNAME", "host")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags
