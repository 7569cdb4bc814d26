"""The optimizer and scheduler groups: factories bound to the model's parameters and the run's step count."""
from __future__ import annotations

import logging

import torch
from transformers import get_scheduler

from llmtrain.runtime import distributed
from llmtrain.errors import ConfigError

log = logging.getLogger(__name__)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; leave biases, LayerNorm weights and other 1-D parameters undecayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fast_kwargs(model: torch.nn.Module) -> dict:
    """The fused implementation (one kernel for all tensors; on a CPU too) where every parameter allows it, else foreach.

    Measured on a 2-core CPU for a 7.6M-parameter model: fused AdamW 0.03 s a step, foreach 0.26 s, the default
    per-tensor loop 0.29 s.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if params and all(p.is_floating_point() and p.device.type in _fused_devices() for p in params):
        return {"fused": True}
    return {"foreach": True}


def _fused_devices() -> list[str]:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return _get_fused_kernels_supported_devices()


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
          eps: float) -> torch.optim.Optimizer:
    """AdamW, fused: the whole update in one kernel instead of a dozen per parameter tensor."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps,
                             **fast_kwargs(model))


def sgd(model: torch.nn.Module, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    """SGD with momentum over the same decay / no-decay groups, fused like adamw."""
    return torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=momentum, **fast_kwargs(model))


def scheduler(optimizer: torch.optim.Optimizer, num_training_steps: int, name: str, warmup_steps: int | None,
              warmup_ratio: float) -> torch.optim.lr_scheduler.LRScheduler:
    """transformers.get_scheduler with warmup given in steps, or as a ratio of the run when warmup_steps is null."""
    warmup = warmup_steps if warmup_steps is not None else int(round(warmup_ratio * num_training_steps))
    if name != "constant" and warmup >= num_training_steps > 0 and distributed.rank() == 0:
        key = f"scheduler.warmup_steps={warmup_steps}" if warmup_steps is not None else \
            f"scheduler.warmup_ratio={warmup_ratio} ({warmup} steps)"
        log.warning("%s is as long as the run (%d training steps): the learning rate is still warming up when "
                    "training ends and never reaches optimizer.lr; lower the warmup or train for more steps", key,
                    num_training_steps)
    try:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=num_training_steps)
    except ValueError as e:
        raise ConfigError(f"scheduler.name={name!r}: {str(e).splitlines()[0]}") from None
