"""Whether and how a launch goes on from a checkpoint: one plan that job.train, its --check and job.preflight use.

plan(cfg) follows train.resume (auto: out_dir's last.pt, or last.prev.pt where that is unreadable; never; a path)
and refuses, in one line, a checkpoint this config cannot go on from: another model, another weight averaging, a
recipe key changed that the checkpoint was made with (the keys' roles in job/config.py say which may change). The
Plan it returns holds the checkpoint, its state, the changes this launch applies, and whether it came from
another run's out_dir; its methods word the lines a resume prints. finished_line(cfg) decides first whether the
launch would only repeat a run finished.json marks as done (or is refused: one finished with other settings).
"""

from dataclasses import dataclass
from pathlib import Path

from job import cli, config, outdir
from job.averaging import MODES
from job.checkpoint import BEST, LAST, CheckpointError, directory, epoch_ended, load
from job.durable import previous
from job.config import Config
from job.loop import TrainState


@dataclass(frozen=True)
class Plan:
    """What a launch starts from: a checkpoint (path, saved state, the settings it changes there) or nothing."""

    path: Path | None = None
    saved: dict | None = None
    changes: tuple[str, ...] = ()
    """"key old -> new" of the settings this launch changes in the checkpoint (they apply from its first step)."""
    foreign: bool = False
    """The checkpoint is another run's (train.resume=PATH outside out_dir): this out_dir's MLflow run is a new one."""

    def words(self) -> str:
        """"resumes PATH, changing KEY OLD -> NEW, ..." or "starts fresh" (--check and job.preflight print it)."""
        if self.path is None:
            return "starts fresh"
        return f"resumes {self.path}" + (f", changing {', '.join(self.changes)}" if self.changes else "")

    def note(self, epoch: int, step: int, epochs: int) -> str:
        """Where the resume goes on: an epoch and step, or, when every epoch is done (a launch stopped in the test or
        the registration), only the end of the run."""
        if epoch >= epochs:
            return f"resuming {self.path}: all {epochs} epochs done; testing and registering"
        return f"resuming {self.path} at epoch {epoch + 1} step {step}"

    def train_state(self) -> tuple[TrainState, str | None]:
        """(where training goes on from, the warning of a best forgotten): a fresh TrainState, or the checkpoint's;
        another run's keeps its epochs but not its MLflow run (that run stays as it is; this out_dir's is a new one)
        nor a best whose weights stayed behind (lost_best)."""
        state = TrainState()
        if not self.saved:
            return state, None
        state.load_state_dict(self.saved["train_state"])
        if self.foreign:
            state.mlflow_run_id = None
        lost = self.lost_best(state.best_epoch)
        if lost:
            state.best_val_acc = state.best_epoch = None
        return state, lost

    def tags(self) -> dict[str, str]:
        """The MLflow tags this start gives the run: resumed_from=PATH for another run's checkpoint, and
        changed.<key> = "old -> new from epoch E [step S] (MLflow step E-1)" for each setting it changes (the run's
        params keep the first launch's values; a reopened run's tag keeps every change: mlflow_run.extend_history)."""
        tags = {"resumed_from": str(self.path.resolve())} if self.foreign else {}
        if self.changes:
            state = self.saved["train_state"]
            where = (f"epoch {state['epoch'] + 1}" + (f" step {state['step']}" if state.get("step") else "")
                     + f" (MLflow step {state['epoch']})")  # the console counts epochs from 1, the metrics from 0
            for change in self.changes:  # "key old -> new"
                key, move = change.split(" ", 1)
                tags[f"changed.{key}"] = f"{move} from {where}"
        return tags

    def world_size_note(self, world_size: int, batch_size: int, steps: int) -> str | None:
        """The line for a checkpoint written at another world size (world_size_change); None at the same one or
        without a checkpoint."""
        return world_size_change(self.saved, world_size, batch_size, steps) if self.saved else None

    def lost_best(self, best_epoch: int | None) -> str | None:
        """The warning for another run's checkpoint copied without the best.pt beside it, whose best epoch is not the
        one it holds: the best weights stayed behind, so the best so far starts again here (None: nothing lost)."""
        if not self.foreign or (self.path.parent / BEST).is_file() or \
                epoch_ended(self.saved["train_state"]) == best_epoch:
            return None
        return (f"{self.path} came without the best.pt beside it (epoch {(best_epoch or 0) + 1}'s weights): the best "
                f"so far is forgotten; the next epoch's validation sets best.pt")


def plan(cfg: Config) -> Plan:
    """The Plan of this launch per train.resume; raises the one line of a checkpoint this config cannot resume."""
    found = resume_from(cfg.train.resume, cfg.train.out_dir, warn=cli.warning)
    if not found:
        return Plan()
    path, saved = found
    check_compatible(saved, cfg, path)
    changes = resume_changes(saved, cfg, path)
    foreign = directory(cfg.train.out_dir).resolve() != path.resolve().parent
    return Plan(path, saved, tuple(changes), foreign)


def finished_line(cfg: Config) -> str | None:
    """The "already finished" line when out_dir holds a finished run of this very config; None when it holds no
    finished run; raises OutDirError when it holds one made with other settings (a relaunch would lie)."""
    if cfg.train.resume == "never":  # a fresh start was asked for: the checkpoint there is refused (resume_path)
        return None
    done = outdir.read_finished(cfg.train.out_dir)
    if done is None:
        return None
    applies, refused = config_changes(done["config"], cfg)
    if applies or refused or cfg.train.resume_file:
        what = ", ".join(applies + refused) or f"train.resume={cfg.train.resume}"
        raise outdir.OutDirError(f"train.out_dir {cfg.train.out_dir} holds a run finished with other settings "
                                 f"({what}); to train on from it use a new out_dir with "
                                 f"train.resume={directory(cfg.train.out_dir) / LAST}")
    run = f", MLflow run {done['mlflow_run_id']}" if done.get("mlflow_run_id") else ""
    return (f"already finished: {cfg.train.out_dir} (test_acc {done['test_acc']:.4f} after {done['epochs']} "
            f"epochs{run}); nothing to do")


def resume_from(resume: str, out_dir: str, warn) -> tuple[Path, dict] | None:
    """(path, state) of the checkpoint to continue from, or None to start fresh, following train.resume.

    `auto` falls back to last.prev.pt (with a warning) when last.pt is missing or unreadable; `never`
    refuses an out_dir that already holds a checkpoint, so that nothing trained is overwritten.
    """
    path = resume_path(resume, out_dir)
    if path is None:
        return None
    try:
        return path, load(path)
    except CheckpointError as e:
        if resume != "auto" or not previous(path).is_file():
            raise
        warn(f"{e}; using the previous checkpoint {previous(path)}")
        return previous(path), load(previous(path))


def resume_path(resume: str, out_dir: str) -> Path | None:
    """The checkpoint file train.resume names (None: start fresh)."""
    last = directory(out_dir) / LAST
    if resume == "auto":
        return last if last.is_file() or previous(last).is_file() else None
    if resume == "never":
        if last.is_file() or previous(last).is_file():
            raise CheckpointError(f"{out_dir} already holds a checkpoint ({last}); use train.resume=auto to "
                                  f"continue it or choose another train.out_dir")
        return None
    if not Path(resume).is_file():
        raise CheckpointError(f"train.resume: checkpoint not found: {resume}")
    if last.is_file() and last.resolve() != Path(resume).resolve():
        # a requeue or restart of a launch that began from another run's checkpoint: go on from this out_dir's
        # own, newer one, not back to where it started
        return last
    return Path(resume)


def check_model(state: dict, model_config: dict, path: Path) -> None:
    """Refuse a checkpoint of a different model shape with one line that says what differs."""
    # a key newer than the checkpoint had its default then (model.bn_momentum, model.zero_init_residual)
    saved = with_defaults(state.get("config", {}))["model"]
    diff = [f"{k}={saved.get(k)} (config says {v})" for k, v in model_config.items() if saved.get(k) != v]
    if diff:
        raise CheckpointError(f"checkpoint {path} is for another model: " + ", ".join(diff))


def with_defaults(saved: dict) -> dict:
    """A saved config with the keys added to the job since it was written at their defaults, which is what the
    run had then (a checkpoint from before train.bn_bias_lr_mult trained with 1)."""
    defaults = Config().to_dict()
    return {section: {**defaults.get(section, {}), **(values if isinstance(values, dict) else {})}
            for section, values in {**defaults, **saved}.items()}


def config_changes(saved: dict, cfg) -> tuple[list[str], list[str]]:
    """("key old -> new" a resume applies, those it refuses) between a saved config and this launch's: the keys'
    roles decide (job/config.py: APPLIES apply, SPEED and LAUNCH change silently, the others are refused)."""
    applies, refused = [], []
    saved, roles = with_defaults(saved), config.roles()
    for name, value in cfg.flat().items():
        section, key = name.split(".", 1)
        old = saved.get(section, {}).get(key, value)
        if old != value and roles[name] not in (config.SPEED, config.LAUNCH):  # those change silently
            (applies if roles[name] == config.APPLIES else refused).append(f"{name} {old} -> {value}")
    return applies, refused


def resume_changes(state: dict, cfg, path: Path) -> list[str]:
    """The settings this launch changes from the checkpoint's ("key old -> new"), after refusing, in one line,
    those a resume cannot honour (config_changes)."""
    changes, refused = config_changes(state["config"], cfg)
    done = state["train_state"]["epoch"] + (1 if state["train_state"].get("step") else 0)  # a begun epoch counts
    if cfg.train.epochs < done:
        verb = "begun" if state["train_state"].get("step") else "done"
        refused.append(f"train.epochs {cfg.train.epochs} (the checkpoint has {verb} {done} epochs)")
    precisions = {state["config"]["train"].get("precision"), cfg.train.precision}
    if "fp16" in precisions and len(precisions) > 1:
        refused.append("train.precision to or from fp16 (its loss scaler's state does not carry over)")
    if refused:
        raise CheckpointError(f"cannot resume {path} with {'; '.join(refused)}: set it back, or train from "
                              f"scratch in another train.out_dir")
    return changes


def world_size_change(state: dict, world_size: int, batch_size: int, steps: int) -> str | None:
    """The resume line when the checkpoint was written at another world size; None at the same one.

    The global batch is the config's, so steps per epoch and the LR schedule stay (floor(n / batch) at any
    world size), and each epoch's permutation depends on (seed, epoch) only: the first k steps at any world
    size take its first k x batch images, so an interrupted epoch goes on with exactly those not yet seen."""
    was = state["world_size"]
    if was == world_size:
        return None
    epoch, step = state["train_state"]["epoch"], state["train_state"].get("step", 0)
    where = (f"epoch {epoch + 1} goes on at step {step} of {steps} with the images the {was} rank(s) had not "
             f"reached" if step else f"epoch {epoch + 1} starts at its beginning")
    return (f"resume: world size {was} -> {world_size}: per-rank batch {batch_size // was} -> "
            f"{batch_size // world_size} (global {batch_size}, {steps} steps per epoch and the LR schedule "
            f"unchanged); {where}; augmentation draws and BatchNorm batches differ from here on from a run "
            f"that stayed at {was}")


def check_compatible(state: dict, cfg, path: Path) -> None:
    """Before any work: the checkpoint holds the model this config builds, and EMA weights exactly when it
    keeps an EMA (resuming across that would lose them or start from nothing)."""
    check_model(state, cfg.to_dict()["model"], path)
    t, was = cfg.train, state["config"]["train"]
    kept = [mode for mode, averager in MODES.items() if averager.state_key in state]
    if kept != ([t.ema_mode] if t.ema_decay else []):
        said = f"train.ema_decay={was.get('ema_decay', 0.0)}" + (f" ema_mode={kept[0]}" if kept and kept[0] != "average"
                                                                  else "")
        now = f"{t.ema_decay}" + (f" ema_mode={t.ema_mode}" if t.ema_decay and t.ema_mode != "average" else "")
        raise CheckpointError(f"checkpoint {path} was trained with {said}: resume it with the same "
                              f"(this launch has {now})")
