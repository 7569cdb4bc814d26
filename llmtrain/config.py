"""Config checks before any work: every node against its target's signature, ranges, and cross-group limits.

All problems are collected and reported together, each naming the key and what to type instead.
"""
from __future__ import annotations

import codecs
import difflib
import inspect
import os
import types
import typing
from pathlib import Path

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from llmtrain.errors import ConfigError, DataError

GROUPS = ("model", "data", "optimizer", "scheduler", "trainer", "hardware")
# Arguments the wiring in run.py supplies at run time, not the YAML.
RUNTIME_ARGS = {"model", "data", "optimizer", "scheduler", "hardware", "run_dir", "hparams", "num_training_steps",
                "device", "self", "settings"}
CONF = Path(__file__).resolve().parent / "conf"  # in the package: a wheel carries it

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
    ("data.tokenizer.min_frequency", lambda v: v >= 1, "use 1 or more"),
    ("data.train_words", lambda v: v >= 100, "use at least 100 words"),
    ("data.validation_words", lambda v: v >= 10, "use at least 10 words"),
    ("hardware.num_threads", lambda v: v is None or v >= 1, "use null (all cores) or 1 or more"),
    ("hardware.num_workers", lambda v: v >= 0, "use 0 or more"),
    ("hardware.nproc_per_node", lambda v: v >= 1, "use 1 or more"),
    ("hardware.timeout_s", lambda v: v >= 1, "use a number of seconds, e.g. 600"),
]
FLOAT_KEYS = ("lr", "weight_decay", "mlm_probability", "validation_split", "warmup_ratio", "min_delta", "max_grad_norm")
# Settings whose value is a mapping the code reads by name: their keys are fixed too.
NESTED = {"trainer.early_stopping": ("patience", "min_delta"), "data.tokenizer": ("name", "vocab_size", "min_frequency")}
CHOICES = {"model.task": ("mlm", "clm", "cls"), "data.source": ("builtin", "wikitext2", "text", "json")}


def _type_hints(fn) -> dict:
    """The target's annotations, evaluated; {} where they cannot be (then only names are checked)."""
    try:
        return typing.get_type_hints(fn if not inspect.isclass(fn) or hasattr(fn, "__dataclass_fields__")
                                     else fn.__init__)
    except Exception:  # noqa: BLE001
        return {}


def _expected(hint) -> str | None:
    """How to describe `hint` to a user ("an integer or null"), or None when any value will do."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(hint) if a is not type(None)]
        words = [w for w in (_expected(a) for a in arms) if w]
        if len(words) < len(arms):
            return None
        return " or ".join(words) + (" or null" if len(arms) < len(typing.get_args(hint)) else "")
    base = typing.get_origin(hint) or hint
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
            tuple: "a list", dict: "a mapping"}.get(base)


def _matches(value, hint) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    base = typing.get_origin(hint) or hint
    checks = {bool: lambda v: isinstance(v, bool),
              int: lambda v: isinstance(v, int) and not isinstance(v, bool),
              float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              str: lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool),  # `data.path=2024` is a name
              list: lambda v: isinstance(v, (list, tuple, ListConfig)),
              tuple: lambda v: isinstance(v, (list, tuple, ListConfig)),
              dict: lambda v: isinstance(v, (dict, DictConfig))}
    return checks[base](value) if base in checks else True


def _show(value) -> str:
    return repr(OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value)


def _check_signature(group: str, node: DictConfig, problems: list[str], bad: set[str]) -> None:
    """Every key is a keyword of the group's target, of the annotated type; every required keyword is set."""
    target = node.get("_target_")
    if target is None:
        problems.append(f"{group}: the config has no _target_; pick an option from conf/{group}/")
        return
    try:
        fn = get_object(target)
    except Exception:  # noqa: BLE001
        problems.append(f"{group}._target_={target}: cannot be imported")
        return
    params = inspect.signature(fn).parameters
    hints = _type_hints(fn)
    known = [p for p in params if p not in RUNTIME_ARGS]
    for key in node:
        key = str(key)
        if key.startswith("_"):
            continue
        if key not in params:
            hint = difflib.get_close_matches(key, known, n=1)
            did = f"; did you mean {group}.{hint[0]}?" if hint else f"; known keys: {', '.join(known)}"
            problems.append(f"{group}.{key} is not a setting of {target}{did}")
            bad.add(f"{group}.{key}")
            continue
        try:
            value = node[key]
        except Exception as e:  # noqa: BLE001 - an interpolation that does not resolve
            problems.append(f"{group}.{key}: {str(e).splitlines()[0]}")
            bad.add(f"{group}.{key}")
            continue
        expected = _expected(hints[key]) if key in hints else None
        if expected and not _matches(value, hints[key]):
            problems.append(f"{group}.{key}={_show(value)} should be {expected}")
            bad.add(f"{group}.{key}")
    missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in RUNTIME_ARGS
               and p not in node and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)]
    for p in missing:
        problems.append(f"{group}.{p} is required by {target}: set it, e.g. {group}.{p}=<value>")


def _check_ranges(cfg: DictConfig, problems: list[str], bad: set[str]) -> None:
    for key, check, fix in RANGES:
        value = OmegaConf.select(cfg, key, default="__absent__")
        if key in bad or value == "__absent__":
            continue
        expected = float if key.split(".")[-1] in FLOAT_KEYS else int
        if value is not None and not _matches(value, expected):
            problems.append(f"{key}={value!r} should be a{'n integer' if expected is int else ' number'}: {fix}")
            bad.add(key)
            continue
        try:
            ok = check(value)
        except TypeError:
            ok = False
        if not ok:
            problems.append(f"{key}={value}: {fix}")
            bad.add(key)
    for key, allowed in NESTED.items():
        node = OmegaConf.select(cfg, key)
        for sub in node if isinstance(node, DictConfig) else []:
            if sub not in allowed:
                hint = difflib.get_close_matches(str(sub), allowed, n=1)
                problems.append(f"{key}.{sub} is not a setting" + (f"; did you mean {key}.{hint[0]}?" if hint else
                                                                   f"; known keys: {', '.join(allowed)}"))
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            problems.append(f"{key}={value!r}: use one of {', '.join(allowed)}")
            bad.add(key)


def validate(cfg: DictConfig, on_this_machine: bool = True) -> None:
    """Raise one ConfigError listing every problem in the composed config. on_this_machine=False leaves out the
    checks against this machine, its devices and data files (a SLURM sweep's jobs run on other machines)."""
    problems: list[str] = []
    missing = sorted(OmegaConf.missing_keys(cfg))
    for key in missing:
        problems.append(f"{key} must be set (e.g. {key}=<value> on the command line)")
    if missing:
        raise ConfigError(problems)
    bad: set[str] = set()
    for group in GROUPS:
        _check_signature(group, cfg[group], problems, bad)
    _check_ranges(cfg, problems, bad)
    _check_values(cfg, problems, bad, on_this_machine)
    if not any(k.startswith("model.") or k == "data.max_length" for k in bad):
        _check_model(cfg, problems)
    if problems:
        raise ConfigError(problems)


def _check_values(cfg: DictConfig, problems: list[str], bad: set[str], on_this_machine: bool) -> None:
    """Settings checked against the world: scheduler names, encodings, the checkpoint to resume, the data files,
    the hardware."""
    from transformers import SchedulerType

    names = [s.value for s in SchedulerType]
    if "scheduler.name" not in bad and cfg.scheduler.get("name") not in names:
        hint = difflib.get_close_matches(str(cfg.scheduler.get("name")), names, n=1)
        problems.append(f"scheduler.name={cfg.scheduler.get('name')!r}: " +
                        (f"did you mean {hint[0]}? " if hint else "") + f"use one of {', '.join(names)}")
    if "data.encodings" not in bad:
        if not cfg.data.encodings:
            problems.append("data.encodings is empty: list the encodings to try, e.g. [utf-8, gbk, latin-1]")
        for enc in cfg.data.encodings or []:
            try:
                codecs.lookup(str(enc))
            except LookupError:
                problems.append(f"data.encodings: {enc!r} is not an encoding Python knows (e.g. utf-8, gbk, latin-1)")
    resume = cfg.trainer.resume
    if "trainer.resume" not in bad and resume not in (None, "auto"):
        _check_resume(str(resume), problems)
    t = cfg.trainer
    if "trainer.early_stopping.patience" not in bad and "trainer.eval_every" not in bad \
            and (t.early_stopping.get("patience") or 0) > 0 and t.eval_every == 0:
        problems.append(f"trainer.early_stopping.patience={t.early_stopping.patience} needs evaluations during the "
                        "run: set trainer.eval_every (e.g. 100) or trainer.early_stopping.patience=0")
    if not on_this_machine:
        return
    if cfg.data.source in ("text", "json") and "data.path" not in bad:  # before a sweep's first job, too
        from llmtrain.data.sources import RECORD_SUFFIXES, TEXT_SUFFIXES, resolve_files

        try:
            resolve_files(cfg.data.path, TEXT_SUFFIXES if cfg.data.source == "text" else RECORD_SUFFIXES)
        except DataError as e:
            problems.extend(e.problems)
    hardware = {k: v for k, v in OmegaConf.to_container(cfg.hardware, resolve=True).items()
                if not k.startswith("_") and f"hardware.{k}" not in bad}
    try:  # Hardware checks device and precision against this machine (keys reported already left out)
        get_object(cfg.hardware._target_)(**hardware)
    except ConfigError as e:
        problems.extend(p for p in e.problems if p not in problems)
    except Exception:  # noqa: BLE001 - reported by the signature check
        pass


def _check_resume(resume: str, problems: list[str]) -> None:
    from llmtrain.training import checkpoint

    if not os.path.exists(os.path.expanduser(resume)):
        problems.append(f"trainer.resume={resume}: no such file or directory; use auto, a run directory, "
                        "or a checkpoints/step-<N> directory")
        return
    try:
        if checkpoint.find(Path("."), resume) is None:
            problems.append(f"trainer.resume={resume}: that run directory has no complete checkpoint yet")
    except ConfigError as e:
        problems.extend(e.problems)


def _check_model(cfg: DictConfig, problems: list[str]) -> None:
    """The HF config the model group describes: loadable, no misspelt fields, enough positions for data.max_length."""
    from llmtrain.training.models import ModelSpec

    spec = ModelSpec(**{k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "_target_"})
    try:
        hf = spec.hf_config()
    except ConfigError as e:
        problems.extend(e.problems)
        return
    if not spec.trust_remote_code:  # custom config classes may take fields we cannot know
        cls = type(hf)
        known = set(cls().to_dict()) | set(getattr(cls, "attribute_map", {}))
        known |= {p for c in cls.__mro__ if "__init__" in vars(c) for p in inspect.signature(c.__init__).parameters}
        for key in spec.config:
            if key not in known:
                hint = difflib.get_close_matches(key, sorted(known), n=1)
                problems.append(f"model.config.{key} is not a field of {cls.__name__}" +
                                (f"; did you mean model.config.{hint[0]}?" if hint else ""))
    positions = getattr(hf, "max_position_embeddings", None)
    if positions is not None and cfg.data.max_length > positions:
        field = "n_positions" if hf.model_type == "gpt2" else "max_position_embeddings"
        problems.append(f"data.max_length={cfg.data.max_length} is more than the model's {positions} positions: "
                        f"lower data.max_length or raise model.config.{field}")


def override_hints(overrides: list[str]) -> list[str]:
    """'Did you mean' lines for command-line keys that are not in the config (Hydra reports them without one)."""
    try:
        return _override_hints(overrides)
    except Exception:  # noqa: BLE001 - a hint is a courtesy; Hydra has reported the error itself
        return []


def _override_hints(overrides: list[str]) -> list[str]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    keys = [o.split("=", 1)[0] for o in overrides if "=" in o and not o.startswith(("+", "~", "hydra"))]
    choices = [o for o in overrides if "=" in o and o.split("=", 1)[0] in GROUPS]
    cfg = None
    for attempt in (choices, []):
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                cfg = compose(config_name="config", overrides=attempt)
            break
        except Exception:  # noqa: BLE001 - a bad group choice: Hydra has said so already
            continue
    if cfg is None:
        return []
    flat = [k for k, _ in _flatten(OmegaConf.to_container(cfg, resolve=False))]
    hints = []
    for key in keys:
        if key in GROUPS or OmegaConf.select(cfg, key, default="__absent__") != "__absent__":
            continue
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        siblings = [k for k in flat if k.rsplit(".", 1)[0] == parent] if parent else []
        match = difflib.get_close_matches(key, siblings or flat, n=1, cutoff=0.6)
        if match:
            hints.append(f"{key} is not a config key: did you mean {match[0]}?")
    return hints


def _flatten(node, prefix: str = ""):
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def hparams(cfg: DictConfig, model_name: str, n_params: int, precision: str, world_size: int = 1) -> dict:
    """The hyperparameters a run is compared by (TensorBoard HParams, sweep summaries)."""
    t = cfg.trainer
    return {"model": model_name, "params": n_params, "batch_size": t.batch_size, "max_length": cfg.data.max_length,
            "grad_accum_steps": t.grad_accum_steps, "world_size": world_size,
            "tokens_per_step": t.batch_size * cfg.data.max_length * t.grad_accum_steps * world_size,
            "lr": cfg.optimizer.lr, "optimizer": cfg.optimizer._target_.rsplit(".", 1)[-1],
            "scheduler": cfg.scheduler.name, "precision": precision, "seed": cfg.seed, "data": cfg.data.source}
