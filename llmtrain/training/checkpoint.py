"""Crash-safe checkpoints: written under a temporary name and renamed, `last`/`best` links swapped atomically;
each records the size and sha256 of its files (checksums.json), checked before it is loaded."""
from __future__ import annotations

import functools
import hashlib
import json
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

from llmtrain.errors import ConfigError, NoSpaceError, UserError, is_no_space

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
CHECKSUMS = "checksums.json"
_unverified: set[Path] = set()  # checkpoints without checksums already warned about
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


def write_model(path: Path, model, tokenizer) -> None:
    """The model in Hugging Face format (safetensors) and its tokenizer, as from_pretrained reads them."""
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


class _Hashing:
    """A file that hashes the bytes written through it: the trainer state is hashed as it is written, not read back."""

    def __init__(self, f):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += memoryview(data).nbytes
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file())


def _digest(path: Path) -> dict:
    sha256 = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha256.update(chunk)
        return {"bytes": f.tell(), "sha256": sha256.hexdigest()}


def _write_files(tmp: Path, model, tokenizer, state: dict) -> None:
    """Weights, tokenizer and trainer state into tmp, then checksums.json recording the size and sha256 of each."""
    write_model(tmp, model, tokenizer)
    # through a Python file: a full disk then surfaces as OSError(ENOSPC), not as torch's bare "unexpected pos"
    with open(tmp / STATE_FILE, "wb") as f:
        hashing = _Hashing(f)
        torch.save(state, hashing)
    files = {p.name: _digest(p) for p in _files(tmp) if p.name not in (STATE_FILE, CHECKSUMS)}
    files[STATE_FILE] = {"bytes": hashing.bytes, "sha256": hashing.sha256.hexdigest()}
    (tmp / CHECKSUMS).write_text(json.dumps({"files": files}, indent=1) + "\n")


def save(directory: Path, step: int, model, tokenizer, state: dict, keep_last: int, is_best: bool) -> Path:
    """Write checkpoints/step-<step>/ completely, with checksums, then point `last` (and `best`) at it, then prune.

    A kill at any instant leaves every earlier checkpoint, and whatever `last`/`best` point at, loadable; so does a
    full disk, which raises NoSpaceError after removing what was half written.
    """
    if any(not torch.isfinite(p).all() for p in model.parameters()):
        raise UserError(f"refusing to save step {step}: the model has non-finite weights "
                        "(lower optimizer.lr, set trainer.max_grad_norm, or use hardware.precision=fp32)")
    final = directory / f"step-{step}"
    tmp, old = directory / f".tmp-step-{step}", directory / f".old-step-{step}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _recover(directory)
        _write_files(tmp, model, tokenizer, state)
        _fsync([*tmp.iterdir(), tmp])
        if final.exists():  # the same step again (e.g. a run resumed at its end): set the old one aside first
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        _link(directory, "last", final.name)
        if is_best:
            _link(directory, "best", final.name)
        _fsync([directory])
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.replace(old, final)
        if is_no_space(e):
            raise NoSpaceError(f"the checkpoint of step {step}", directory,
                               "free disk space, or set trainer.keep_last lower") from e
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


def _problem(path: Path) -> str | None:
    """What is wrong with the files of the checkpoint at `path`, as against its checksums.json; None if nothing."""
    try:
        files = json.loads((path / CHECKSUMS).read_text())["files"]
        sizes = {name: int(want["bytes"]) for name, want in files.items()}
        hashes = {name: str(want["sha256"]) for name, want in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{path / CHECKSUMS} cannot be read ({type(e).__name__}: {e})"
    for name, want in sizes.items():  # sizes first: cheap, and they say more than a checksum does
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != want:
            return (f"{f} is empty (0 bytes; {want} were written)" if size == 0 else
                    f"{f} is truncated ({size} of {want} bytes)" if size < want else
                    f"{f} has {size} bytes; {want} were written")
    for name, want in hashes.items():
        if _digest(path / name)["sha256"] != want:
            return f"{path / name} does not match the checksum recorded when it was saved (its bytes changed)"
    return None


@functools.lru_cache(maxsize=64)
def _checked(path: Path, signature: tuple) -> str | None:
    return _problem(path)


def verify(path: Path) -> str | None:
    """What is damaged in the checkpoint at `path` (a file missing, empty, truncated or changed), or None if intact.

    Hashing reads the whole checkpoint, so the answer is remembered until a file in it changes (find, then load).
    A checkpoint from before checksums were written is not verified (a warning says so, once).
    """
    path = Path(path).resolve()
    if not (path / CHECKSUMS).exists():
        if path not in _unverified:
            _unverified.add(path)
            log.warning("checkpoint %s has no %s (saved by an older llmtrain): loading it unverified", path,
                        CHECKSUMS)
        return None
    stats = [(p.name, p.stat()) for p in _files(path)]
    return _checked(path, tuple((name, s.st_size, s.st_mtime_ns) for name, s in stats))


def find(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint `trainer.resume` names: `auto` = the newest intact one in this run, or a path.

    With `auto` a damaged checkpoint is passed over with a warning; a damaged one named by path (or the newest
    of a named run directory) is refused, naming the file that is wrong.
    """
    if resume == "auto":
        _recover(run_dir / "checkpoints")
        ckpts = step_dirs(run_dir / "checkpoints")
        for _, path in reversed(ckpts):
            if (problem := verify(path)) is None:
                return path
            log.warning("checkpoint %s is damaged: %s; resuming from an older one", path, problem)
        if ckpts:
            raise ConfigError(f"trainer.resume=auto: every checkpoint in {run_dir / 'checkpoints'} is damaged "
                              f"(the oldest: {problem}); delete that directory to train from the start")
        return None
    path = Path(os.path.expanduser(resume))
    if path.is_dir() and (path / "checkpoints").is_dir():  # a run directory: its newest, which must be intact
        _recover(path / "checkpoints")
        ckpts = step_dirs(path / "checkpoints")
        if not ckpts:
            return None
        path = ckpts[-1][1]
    if not (path / STATE_FILE).exists():
        raise ConfigError(f"trainer.resume={resume}: not a checkpoint directory (no {STATE_FILE}); "
                          "use auto, a run directory, or a checkpoints/step-<N> path")
    if (problem := verify(path)) is not None:
        raise ConfigError(f"trainer.resume={resume}: the checkpoint {path} is damaged: {problem}; "
                          "name an older checkpoint (checkpoints/step-<N>) or use trainer.resume=auto")
    return path


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0][:200] if lines else "") or type(e).__name__


def load(path: Path, model) -> dict:
    """Verify the checkpoint, load weights into `model` and return the trainer state (weights_only=True)."""
    if (problem := verify(path)) is not None:
        raise ConfigError(f"trainer.resume={path}: the checkpoint is damaged: {problem}; "
                          "pick another checkpoint (checkpoints/step-<N>)")
    try:
        weights = load_file(path / "model.safetensors")
    except (OSError, SafetensorError) as e:
        raise ConfigError(f"trainer.resume={path}: cannot read model.safetensors ({_first_line(e)}); "
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
    state_file = path / STATE_FILE
    try:
        if state_file.stat().st_size == 0:
            raise EOFError("the file is empty")
        return torch.load(state_file, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        raise ConfigError(f"trainer.resume={path}: {state_file} is damaged or not a plain-tensor trainer state and "
                          f"is not loaded ({_first_line(e)}); pick a checkpoint llmtrain wrote") from None
