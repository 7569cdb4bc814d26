"""The optimizer and scheduler groups: factories bound to the model's parameters and the run's step count."""
from __future__ import annotations

import torch
from transformers import get_scheduler

from llmtrain.errors import ConfigError


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; leave biases, LayerNorm weights and other 1-D parameters undecayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
          device: str = "cpu") -> torch.optim.Optimizer:
    """AdamW with the foreach implementation (fused on CUDA): one kernel per group, not per tensor."""
    fast = {"fused": True} if device == "cuda" else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps, **fast)


def sgd(model: torch.nn.Module, lr: float, weight_decay: float, momentum: float,
        device: str = "cpu") -> torch.optim.Optimizer:
    """SGD with momentum over the same decay / no-decay groups."""
    return torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=momentum, foreach=True)


def scheduler(optimizer: torch.optim.Optimizer, num_training_steps: int, name: str, warmup_steps: int | None,
              warmup_ratio: float) -> torch.optim.lr_scheduler.LRScheduler:
    """transformers.get_scheduler with warmup given in steps, or as a ratio of the run when warmup_steps is null."""
    warmup = warmup_steps if warmup_steps is not None else int(round(warmup_ratio * num_training_steps))
    try:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=num_training_steps)
    except ValueError as e:
        raise ConfigError(f"scheduler.name={name!r}: {str(e).splitlines()[0]}") from None
