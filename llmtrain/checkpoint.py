"""Crash-safe checkpoints: written under a temporary name and renamed, `last`/`best` links swapped atomically."""
from __future__ import annotations

import errno
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from llmtrain.errors import ConfigError, UserError

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    """Every random state the run depends on, in types that torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                      int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _link(directory: Path, name: str, target: str) -> None:
    tmp = directory / f".{name}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, directory / name)


def step_dirs(directory: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a trainer state) in step order."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_DIR.match(p.name))]
    return sorted((s, p) for s, p in found if (p / STATE_FILE).exists())


def _fsync(paths: list[Path]) -> None:
    """Flush files (and directories' entries) to disk, so that a rename publishes complete data."""
    for f in paths:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _recover(directory: Path) -> None:
    """Finish what a kill interrupted: drop half-written `.tmp-step-*`, restore a `.old-step-*` set aside."""
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        if p.name.startswith(".tmp-step-"):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".old-step-"):
            final = directory / p.name[len(".old-"):]
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.replace(p, final)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # errors a user fixes by freeing disk space


def write_model(path: Path, model, tokenizer) -> None:
    """The model in Hugging Face format (safetensors) and its tokenizer, as from_pretrained reads them."""
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def save(directory: Path, step: int, model, tokenizer, state: dict, keep_last: int, is_best: bool) -> Path:
    """Write checkpoints/step-<step>/ completely, then point `last` (and `best`) at it, then prune old ones.

    A kill at any instant leaves every earlier checkpoint, and whatever `last`/`best` point at, loadable.
    """
    if any(not torch.isfinite(p).all() for p in model.parameters()):
        raise UserError(f"refusing to save step {step}: the model has non-finite weights "
                        "(lower optimizer.lr, set trainer.max_grad_norm, or use hardware.precision=fp32)")
    final = directory / f"step-{step}"
    tmp, old = directory / f".tmp-step-{step}", directory / f".old-step-{step}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _recover(directory)
        write_model(tmp, model, tokenizer)
        torch.save(state, tmp / STATE_FILE)
        _fsync([*tmp.iterdir(), tmp])
        if final.exists():  # the same step again (e.g. a run resumed at its end): set the old one aside first
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        _link(directory, "last", final.name)
        if is_best:
            _link(directory, "best", final.name)
        _fsync([directory])
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.replace(old, final)
        if e.errno in NO_SPACE:
            raise UserError(f"no space left to save the checkpoint of step {step} in {directory}: free disk space, "
                            "or set trainer.keep_last lower; the previous checkpoint is intact") from None
        raise
    prune(directory, keep_last)
    return final


def prune(directory: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints; never the ones `best` and `last` point at."""
    if keep_last <= 0:
        return
    keep = {(directory / name).resolve() for name in ("best", "last") if (directory / name).exists()}
    for _, path in step_dirs(directory)[:-keep_last]:
        if path.resolve() not in keep:
            shutil.rmtree(path, ignore_errors=True)


def find(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint `trainer.resume` names: `auto` = the newest complete one in this run, or a path."""
    if resume == "auto":
        _recover(run_dir / "checkpoints")
        ckpts = step_dirs(run_dir / "checkpoints")
        return ckpts[-1][1] if ckpts else None
    path = Path(os.path.expanduser(resume))
    if path.is_dir() and (path / "checkpoints").is_dir():  # a run directory: take its newest
        return find(path, "auto")
    if not (path / STATE_FILE).exists():
        raise ConfigError(f"trainer.resume={resume}: not a checkpoint directory (no {STATE_FILE}); "
                          "use auto, a run directory, or a checkpoints/step-<N> path")
    return path


def load(path: Path, model) -> dict:
    """Load weights into `model` and return the trainer state (tensors only: weights_only=True)."""
    try:
        weights = load_file(path / "model.safetensors")
    except (OSError, SafetensorError) as e:
        raise ConfigError(f"trainer.resume={path}: cannot read model.safetensors ({e}); "
                          "pick another checkpoint (checkpoints/step-<N>)") from None
    own = model.state_dict()
    resized = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in weights.items()
               if k in own and v.shape != own[k].shape]
    if resized:
        raise ConfigError(f"trainer.resume={path}: the checkpoint does not fit this model ({len(resized)} weights "
                          f"differ in shape, e.g. {resized[0]}); resume with the model config it was trained with")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not any(k.endswith(t) for t in tied)]
    if missing or unexpected:
        raise ConfigError(f"trainer.resume={path}: the checkpoint does not fit this model "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]}); resume with the same model config")
    try:
        return torch.load(path / STATE_FILE, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ConfigError(f"trainer.resume={path}: {STATE_FILE} is not a plain-tensor trainer state and is not "
                          f"loaded ({str(e).splitlines()[0][:200]}); pick a checkpoint llmtrain wrote") from None
