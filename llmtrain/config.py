"""Config checks before any work: every node against its target's signature, ranges, and cross-group limits.

All problems are collected and reported together, each naming the key and what to type instead.
"""
from __future__ import annotations

import difflib
import inspect

from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from llmtrain.errors import ConfigError

GROUPS = ("model", "data", "optimizer", "scheduler", "trainer", "hardware")
# Arguments the wiring in run.py supplies at run time, not the YAML.
RUNTIME_ARGS = {"model", "data", "optimizer", "scheduler", "hardware", "run_dir", "hparams", "num_training_steps",
                "device", "self"}

# (key, check, what to type instead)
RANGES = [
    ("trainer.epochs", lambda v: v >= 1, "use 1 or more"),
    ("trainer.max_steps", lambda v: v is None or v >= 1, "use null or a positive number of optimizer steps"),
    ("trainer.batch_size", lambda v: v >= 1, "use 1 or more"),
    ("trainer.grad_accum_steps", lambda v: v >= 1, "use 1 or more"),
    ("trainer.max_grad_norm", lambda v: v is None or v > 0, "use a positive norm, or null for no clipping"),
    ("trainer.log_every", lambda v: v >= 1, "use 1 or more"),
    ("trainer.eval_every", lambda v: v >= 0, "use 0 (only at the end) or a positive number of steps"),
    ("trainer.save_every", lambda v: v >= 0, "use 0 (only at the end) or a positive number of steps"),
    ("trainer.keep_last", lambda v: v >= 0, "use 0 (keep all) or a positive number"),
    ("trainer.max_bad_steps", lambda v: v >= 1, "use 1 or more"),
    ("trainer.eval_max_batches", lambda v: v is None or v >= 1, "use null (all) or a positive number"),
    ("trainer.early_stopping.patience", lambda v: v >= 0, "use 0 (off) or a number of evaluations"),
    ("trainer.early_stopping.min_delta", lambda v: v >= 0, "use 0 or a positive loss difference"),
    ("optimizer.lr", lambda v: v > 0, "use a positive learning rate, e.g. 5e-4"),
    ("optimizer.weight_decay", lambda v: v >= 0, "use 0 or a positive number"),
    ("scheduler.warmup_steps", lambda v: v is None or v >= 0, "use null (warmup_ratio) or a number of steps"),
    ("scheduler.warmup_ratio", lambda v: 0 <= v < 1, "use a fraction in [0, 1)"),
    ("data.max_length", lambda v: v >= 2, "use 2 or more tokens per block"),
    ("data.mlm_probability", lambda v: 0 < v < 1, "use a probability strictly between 0 and 1, e.g. 0.15"),
    ("data.validation_split", lambda v: v is None or 0 < v < 1, "use null or a fraction between 0 and 1"),
    ("data.tokenizer.vocab_size", lambda v: v is None or v >= 64, "use at least 64"),
    ("data.train_words", lambda v: v >= 100, "use at least 100 words"),
    ("data.validation_words", lambda v: v >= 10, "use at least 10 words"),
    ("hardware.num_workers", lambda v: v >= 0, "use 0 or more"),
    ("hardware.nproc_per_node", lambda v: v >= 1, "use 1 or more"),
]


def _check_signature(group: str, node: DictConfig, problems: list[str]) -> None:
    target = node.get("_target_")
    if target is None:
        problems.append(f"{group}: the config has no _target_; pick an option from conf/{group}/")
        return
    try:
        fn = get_method(target) if not inspect.isclass(_locate(target)) else _locate(target)
    except Exception:  # noqa: BLE001
        problems.append(f"{group}._target_={target}: cannot be imported")
        return
    params = inspect.signature(fn).parameters
    known = [p for p in params if p not in RUNTIME_ARGS]
    for key in node:
        if str(key).startswith("_"):
            continue
        if key not in params:
            hint = difflib.get_close_matches(str(key), known, n=1)
            did = f"; did you mean {group}.{hint[0]}?" if hint else f"; known keys: {', '.join(known)}"
            problems.append(f"{group}.{key} is not a setting of {target}{did}")
    missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in RUNTIME_ARGS
               and p not in node and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)]
    for p in missing:
        problems.append(f"{group}.{p} is required by {target}: set it, e.g. {group}.{p}=<value>")


def _locate(path: str):
    from hydra._internal.utils import _locate as locate

    return locate(path)


def _type_ok(value, expected) -> bool:
    if value is None:
        return True
    if expected is bool:
        return isinstance(value, bool)
    if expected in (int,):
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True


def validate(cfg: DictConfig) -> None:
    """Raise one ConfigError listing every problem in the composed config."""
    problems: list[str] = []
    missing = sorted(OmegaConf.missing_keys(cfg))
    for key in missing:
        problems.append(f"{key} must be set (e.g. {key}=<value> on the command line)")
    if missing:
        raise ConfigError(problems)
    for group in GROUPS:
        _check_signature(group, cfg[group], problems)
    for key, check, fix in RANGES:
        value = OmegaConf.select(cfg, key, default="__absent__")
        if value == "__absent__":
            continue
        expected = float if key.split(".")[-1] in ("lr", "weight_decay", "mlm_probability", "validation_split",
                                                   "warmup_ratio", "min_delta", "max_grad_norm") else int
        if not _type_ok(value, expected):
            problems.append(f"{key}={value!r} should be a{'n integer' if expected is int else ' number'}: {fix}")
            continue
        try:
            ok = check(value)
        except TypeError:
            ok = False
        if not ok:
            problems.append(f"{key}={value}: {fix}")
    if cfg.trainer.resume not in (None, "auto") and not isinstance(cfg.trainer.resume, str):
        problems.append(f"trainer.resume={cfg.trainer.resume!r}: use null, auto or a checkpoint path")
    if not problems:
        _check_positions(cfg, problems)
    if problems:
        raise ConfigError(problems)


def _check_positions(cfg: DictConfig, problems: list[str]) -> None:
    from llmtrain.models import ModelSpec

    spec = ModelSpec(**{k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "_target_"})
    try:
        positions = spec.max_positions()
    except ConfigError as e:
        problems.extend(e.problems)
        return
    if positions is not None and cfg.data.max_length > positions:
        field = "n_positions" if spec.arch == "gpt2" else "max_position_embeddings"
        problems.append(f"data.max_length={cfg.data.max_length} is more than the model's {positions} positions: "
                        f"lower data.max_length or raise model.config.{field}")


def hparams(cfg: DictConfig, model_name: str, n_params: int, precision: str, world_size: int = 1) -> dict:
    """The hyperparameters a run is compared by (TensorBoard HParams, sweep summaries)."""
    t = cfg.trainer
    return {"model": model_name, "params": n_params, "batch_size": t.batch_size, "max_length": cfg.data.max_length,
            "grad_accum_steps": t.grad_accum_steps, "world_size": world_size,
            "tokens_per_step": t.batch_size * cfg.data.max_length * t.grad_accum_steps * world_size,
            "lr": cfg.optimizer.lr, "optimizer": cfg.optimizer._target_.rsplit(".", 1)[-1],
            "scheduler": cfg.scheduler.name, "precision": precision, "seed": cfg.seed, "data": cfg.data.source}
