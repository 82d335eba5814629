"""Weight averaging (train.ema_decay): an EMA copy of the model, or airbench's Lookahead on the model itself.

Both are written for the step loop: the number of updates comes from the step count (a Python int, the same
after a resume), the float tensors move with one `_foreach_lerp_` and integer buffers (BatchNorm's
num_batches_tracked) are copied, so an update launches a few kernels and never waits for the device.
"""

import copy

import torch
from torch import nn


def _split(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(float tensors, other tensors) of model's state: weights and BatchNorm statistics, then integer counters."""
    state = list(model.state_dict(keep_vars=True).values())
    floats = [t.detach() for t in state if t.is_floating_point()]
    return floats, [t.detach() for t in state if not t.is_floating_point()]


class EMA:
    """An exponential moving average of the weights and BatchNorm buffers, in a copy of the model (`module`),
    updated every `every` steps with decay min(decay, (1 + n) / (10 + n)) after n updates: the average starts
    close to the model and forgets its random start within tens of updates, whatever the decay."""

    state_key = "ema"  # checkpoints hold it under this key; checkpoint.weights() predicts with it

    def __init__(self, model: nn.Module, decay: float, every: int = 1):
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay, self.every = decay, every
        self._floats, self._others = _split(self.module)
        self._source = _split(model)

    def rate(self, updates: int) -> float:
        """The decay of the update after `updates` earlier ones."""
        return min(self.decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self, step: int, total_steps: int) -> None:
        """After optimizer step `step` (1-based, counted over the whole run) of total_steps."""
        if step % self.every:
            return
        weight = 1 - self.rate(step // self.every - 1)
        torch._foreach_lerp_(self._floats, self._source[0], weight)
        torch._foreach_copy_(self._others, self._source[1])

    def end_epoch(self) -> None:
        """Nothing: the average is its own model."""

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])


class Lookahead:
    """airbench's Lookahead: every `every` steps the slow weights (float state, BatchNorm statistics included) move
    toward the model's by 1 - rho, rho = decay**every * (step / total_steps)**3 (hardly averaged early, strongly at
    the end), and the model is set to them; at each epoch's end the model is set to them again, so validation,
    checkpoints and the registered model see the averaged weights."""

    state_key = "lookahead"  # not "ema": the model itself holds the weights to predict with

    def __init__(self, model: nn.Module, decay: float, every: int = 5):
        self.decay, self.every = decay, every
        self._fast = _split(model)[0]
        self._slow = [t.clone() for t in self._fast]

    @torch.no_grad()
    def update(self, step: int, total_steps: int) -> None:
        """After optimizer step `step` (1-based, counted over the whole run) of total_steps."""
        if step % self.every:
            return
        rho = self.decay ** self.every * (step / total_steps) ** 3
        torch._foreach_lerp_(self._slow, self._fast, 1 - rho)
        torch._foreach_copy_(self._fast, self._slow)

    @torch.no_grad()
    def end_epoch(self) -> None:
        """The model takes the slow weights (the steps since the last update are dropped, as in airbench)."""
        torch._foreach_copy_(self._fast, self._slow)

    def state_dict(self) -> dict:
        return {"slow": list(self._slow)}  # checkpoint.snapshot copies them to the host

    def load_state_dict(self, state: dict) -> None:
        if len(state["slow"]) != len(self._slow):  # another model's: a prefix would load without a word
            raise ValueError(f"lookahead state of {len(state['slow'])} tensors for a model of {len(self._slow)}")
        torch._foreach_copy_(self._slow, [t.to(s.device) for t, s in zip(state["slow"], self._slow)])


MODES = {"average": EMA, "lookahead": Lookahead}  # train.ema_mode -> its averager (and its checkpoint key)


def build(model: nn.Module, decay: float, mode: str, every: int) -> EMA | Lookahead | None:
    """train.ema_decay / ema_mode / ema_every_steps as an averager (None when ema_decay is 0)."""
    if not decay:
        return None
    return MODES[mode](model, decay, every)


def predictor(model: nn.Module, averager: EMA | Lookahead | None) -> nn.Module:
    """The bare module whose weights a run predicts with: the EMA copy, or the model itself (Lookahead's too)."""
    return averager.module if isinstance(averager, EMA) else model
