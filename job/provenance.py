"""Where a run comes from: the source commit, a hash of the recipe, and the tags every MLflow run carries."""

import hashlib
import json
import os
import subprocess
from pathlib import Path

import torch

from job import config
from job.config import Config
from job.distributed import Runtime


def recipe(params: dict[str, object], *, seed: bool = True) -> dict[str, str]:
    """The settings of params ({"train.lr": 0.1}, or an MLflow run's params as strings) that make the recipe: all
    but the LAUNCH keys (job/config.py's roles), and the seed only if seed. A key this version does not know (an
    older run's) counts, unless it is MLflow's own."""
    roles, skip = config.roles(), {config.LAUNCH} | (set() if seed else {config.SEED})
    return {key: str(value) for key, value in params.items()
            if roles.get(key, config.LAUNCH if key.startswith("mlflow.") else config.RECIPE) not in skip}


def recipe_hash(params: dict[str, object], *, seed: bool = True) -> str:
    """Short hash of recipe(params, seed=seed): the same for a Config's flat() and the MLflow params logged from it."""
    return digest(recipe(params, seed=seed))


def digest(settings: dict[str, str]) -> str:
    """The short hash of a recipe's settings (recipe()'s answer)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def config_hash(cfg: Config) -> str:
    """The run's recipe hash, seed included (where outputs go, how the launch is chunked and MLflow are not)."""
    return recipe_hash(cfg.flat())


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
