"""A run's state in one object: where it is, what it has counted, what decides its result. A checkpoint saves it
whole (beside the weights, optimizer, schedule and random states) and a resume restores it whole, so a new field
is one edit here."""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class RunState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch consumed (this rank's, at world_size x batch_size)
    tokens_seen: int = 0
    total_steps: int = 0  # the run's length when this was saved (a longer resumed run stretches the schedule)
    world_size: int = 1
    batch_size: int = 0
    best_eval_loss: float = math.inf
    bad_steps: int = 0  # non-finite steps in a row
    skipped_steps: int = 0
    evals_since_best: int = 0
    early_stopping_ref: float = math.inf  # the eval loss at the last improvement of at least min_delta
    early_stopped: bool = False
    window_loss: float = 0.0  # the logging window, so a resumed run logs the same means
    window_n: int = 0
    final_eval: dict[str, float] | None = None  # the end-of-run evaluation, once done (a resume does not repeat it)
    settings: dict[str, Any] = field(default_factory=dict)  # the flat config that made the run (rundir.settings)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        legacy = {"log_window": ("window_loss", "window_n")}  # checkpoints written before RunState
        for old, new in legacy.items():
            if old in state:
                state = {**state, **dict(zip(new, state[old]))}
        for f in fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])
        if "early_stopping_ref" not in state:
            self.early_stopping_ref = self.best_eval_loss


def stretch_schedule(scheduler, step: int, old_total: int, new_total: int) -> bool:
    """A run resumed with a longer length: the rest of its learning-rate schedule, from `step` on, is stretched over
    the new remaining steps, so the rate goes on from where it was and ends where the old schedule ended.

    `scheduler` must have been built for old_total steps. False where it is not a LambdaLR (nothing changed).
    """
    if not hasattr(scheduler, "lr_lambdas") or new_total <= step or old_total <= step:
        return False
    scale = (old_total - step) / (new_total - step)
    scheduler.lr_lambdas = [functools.partial(_stretched, f, step, scale) for f in scheduler.lr_lambdas]
    return True


def _stretched(f, step: int, scale: float, s: int) -> float:
    return f(s) if s <= step else f(step + (s - step) * scale)
