"""The run directory's record stays true: one live run per directory, and a run's settings checked on every return.

Hydra calls `RunDirectory.on_job_start` (a callback in conf/config.yaml) in the process that runs the job, before
the job writes anything. Hydra's own saving of `.hydra/` is off (`hydra.output_subdir: null`, since Hydra 1.3
saves it before any callback runs) and done here, once the directory is locked and the config is checked, so a
refused run leaves the directory exactly as it was. Hydra imports this module at start-up: it stays free of torch.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

from llmtrain.errors import ConfigError, UserError, is_no_space, writing

log = logging.getLogger("llmtrain")

LOCK_FILE = ".lock"
CHANGES_FILE = "config_changes.jsonl"  # every resume that changed a setting: when, which keys, old -> new
RECORDS = ("metrics.jsonl", "checkpoints", "model")  # a directory holding any of these holds a run's record
# Settings that decide how often things happen or how the work is spread, not what is learned: free on resume.
MAY_CHANGE = ("trainer.log_every", "trainer.eval_every", "trainer.save_every", "trainer.keep_last",
              "trainer.progress", "trainer.profile", "trainer.resume", "hardware.num_threads", "hardware.num_workers",
              "hardware.timeout_s", "hardware.distributed", "hardware.nproc_per_node", "allow_changes")
# The run's length: it may grow on resume (the rest of the schedule is stretched; trainer.py), never shrink.
LENGTH = ("trainer.max_steps", "trainer.epochs")
ABSENT = "<absent>"


# ---- one live run per directory ---------------------------------------------------------------------------------
class RunLock:
    """An exclusive lock (flock) on <run dir>/.lock, held while the run lives; the kernel drops it when the holder
    dies, so a lock a killed run left is taken over (and said so). The file names its holder."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock; UserError naming the holder if a live run has it. Nothing in the file changes yet."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(f"{self.path.parent} is in use by another run ({_describe(holder)}): wait for it to "
                            "finish, or give this run its own directory (hydra.run.dir=<new dir>)") from None
        self.fd = fd
        return self

    def claim(self) -> None:
        """Name this process as the holder (once the run may go ahead); say so if a dead run's lock is taken over."""
        previous = _read_holder(self.fd)
        if previous.get("pid"):  # a run that ended normally leaves the file empty
            log.warning("%s: taking over the lock of a run that is no longer alive (%s)", self.path.parent,
                        _describe(previous))
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                                       "command": " ".join(sys.argv)}).encode(), 0)

    def release(self, claimed: bool = True) -> None:
        if self.fd is not None:
            if claimed:
                os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 65536, 0) or b"{}")
    except ValueError:
        return {}


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "holder unknown"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder['pid']} on {holder.get('host', '?')}, since {since}: {holder.get('command', '')}".rstrip(": ")


# ---- the run's identity ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"


def _show(value) -> str:
    return value if value == ABSENT else json.dumps(value)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{'trainer.batch_size': 16, ...}: every leaf of a (plain) config, by its dotted key."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): node}


def settings(cfg: DictConfig | dict) -> dict[str, Any]:
    """The flat, resolved settings of a run (the job's config without Hydra's own node)."""
    if isinstance(cfg, DictConfig):
        cfg = {str(k): (OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], (DictConfig, ListConfig))
                        else cfg[k]) for k in cfg if k != "hydra"}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in flatten(dict(cfg)).items()}


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Settings whose values differ; Hydra's own keys (`_target_`, `_partial_`: where the code lives) are not
    settings, so a run made before a module moved still resumes."""
    keys = {k for k in set(old) | set(new) if not k.rsplit(".", 1)[-1].startswith("_")}
    return [Change(k, old.get(k, ABSENT), new.get(k, ABSENT)) for k in sorted(keys)
            if old.get(k, ABSENT) != new.get(k, ABSENT)]


def allowed(cfg: dict[str, Any]) -> set[str] | bool:
    """The keys `allow_changes` lets change on resume: a key, a list of keys, or `all` (True)."""
    value = cfg.get("allow_changes", [])
    if value == "all" or value == ["all"]:
        return True
    return {str(v) for v in (value if isinstance(value, list) else [value] if value else [])}


def _world(flat: dict[str, Any]) -> int:
    return int(flat.get("hardware.nproc_per_node") or 1) if flat.get("hardware.distributed") else 1


def classify(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[Change], list[Change], list[Change]]:
    """(free, length, refused): settings that may change on resume, the run's length, and the rest.

    A different per-device batch is free when the global batch (per device x devices) is the same: resuming
    across world sizes continues with the same examples (distributed.resume_position).
    """
    free, length, refused = [], [], []
    same_global = old.get("trainer.batch_size", 0) * _world(old) == new.get("trainer.batch_size", 0) * _world(new)
    for c in changes(old, new):
        if c.key in MAY_CHANGE or (c.key == "trainer.batch_size" and same_global):
            free.append(c)
        elif c.key in LENGTH:
            length.append(c)
        else:
            refused.append(c)
    return free, length, refused


def check(old: dict[str, Any], new: dict[str, Any], where: str) -> tuple[list[Change], list[Change]]:
    """(accepted changes, those of them that allow_changes let through); ConfigError listing the refused ones."""
    free, length, refused = classify(old, new)
    permit = allowed(new)
    forced = [c for c in refused if permit is True or c.key in permit]
    refused = [c for c in refused if c not in forced]
    if refused:
        keys = ",".join(c.key for c in refused)
        raise ConfigError("\n".join([
            f"{where} was made with other settings; resuming it would mix two runs in one record. Changed (old -> new):",
            *(f"  {c}" for c in refused),
            "Run with the recorded values, give this run its own directory, or let the changes through on purpose "
            f"with 'allow_changes=[{keys}]' (recorded in {CHANGES_FILE})"]))
    return free + length + forced, forced


def read_status(run_dir: Path) -> dict:
    """The run's metrics.json (status `completed`, `failed` or `interrupted`), or {} while it runs or if it died."""
    try:
        return json.loads((Path(run_dir) / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}


def has_record(run_dir: Path) -> bool:
    return any((Path(run_dir) / name).exists() for name in RECORDS)


def recorded_settings(run_dir: Path) -> dict[str, Any] | None:
    """The settings the run in run_dir was made with (its .hydra/config.yaml), or None where there is none."""
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    try:
        cfg = OmegaConf.load(path)
        return settings(OmegaConf.to_container(cfg, resolve=True))
    except Exception as e:  # noqa: BLE001 - a damaged or hand-edited record
        raise ConfigError(f"{path}: cannot be read ({str(e).splitlines()[0]}); it records the settings of the run "
                          "in that directory: restore it, or give this run its own directory") from None


def source_run(resume: str | None, run_dir: Path) -> Path | None:
    """The directory of the run a resume continues: run_dir itself, or the run a named checkpoint belongs to."""
    if not resume or resume == "auto":
        return run_dir
    path = Path(os.path.expanduser(str(resume))).resolve()
    if (path / "checkpoints").is_dir():
        return path
    if path.parent.name == "checkpoints":
        return path.parent.parent
    return None


def record_changes(run_dir: Path, accepted: list[Change], forced: list[Change], resume: str | None) -> None:
    """One line in config_changes.jsonl per resume that changed settings, and the same in the log."""
    if not accepted:
        return
    for c in accepted:
        log.info("resuming with %s%s", c, " (let through by allow_changes)" if c in forced else "")
    line = {"time": time.time(), "resume": resume, "changes": {c.key: [c.old, c.new] for c in accepted},
            "allowed_by_allow_changes": [c.key for c in forced]}
    with open(Path(run_dir) / CHANGES_FILE, "a") as f:
        f.write(json.dumps(line, default=str) + "\n")


# ---- the Hydra callback ----------------------------------------------------------------------------------------
_locks: dict[Path, RunLock] = {}
_accepted: dict[Path, list[Change]] = {}


def accepted_changes(run_dir: Path) -> list[Change]:
    """What the callback let change in this job's run directory (run.py: a sweep job whose length grew resumes)."""
    return _accepted.get(Path(run_dir).resolve(), [])


class RunDirectory(Callback):
    """Lock the job's directory, check a returning run's settings against its record, then save `.hydra/`."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(config.hydra.runtime.output_dir).resolve()
        multirun = config.hydra.mode == RunMode.MULTIRUN
        lock = RunLock(run_dir)
        try:  # SystemExit: Hydra turns a callback's exceptions into warnings and would run the job anyway
            lock.acquire()
            new = settings(config)
            accepted, forced = self._check(run_dir, new, multirun)
            with writing("the run's config (.lock, .hydra/ and config_changes.jsonl)", run_dir):
                lock.claim()
                save_hydra_files(config, run_dir)
                record_changes(run_dir, accepted, forced, new.get("trainer.resume"))
        except UserError as e:
            lock.release(claimed=False)
            refuse(run_dir, e)
        _locks[run_dir], _accepted[run_dir] = lock, accepted

    @staticmethod
    def _check(run_dir: Path, new: dict[str, Any], multirun: bool) -> tuple[list[Change], list[Change]]:
        resume = new.get("trainer.resume") or ("auto" if multirun else None)  # a sweep's jobs resume (sweep.py)
        if has_record(run_dir) and not resume:
            raise ConfigError(f"{run_dir} already holds a run: continue it with trainer.resume=auto, or give "
                              "this run its own directory (hydra.run.dir=<new dir>)")
        source = source_run(resume, run_dir) if resume else None
        if source is None or not has_record(source):
            return [], []
        old = recorded_settings(source)
        if old is None:
            log.warning("%s has no .hydra/config.yaml: the settings it was made with cannot be checked", source)
            return [], []
        return check(old, new, str(source))

    def on_job_end(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(config.hydra.runtime.output_dir).resolve()
        _accepted.pop(run_dir, None)
        if (lock := _locks.pop(run_dir, None)) is not None:
            lock.release()


def save_hydra_files(config: DictConfig, run_dir: Path) -> None:
    """What Hydra itself would save: .hydra/config.yaml (the job's config), hydra.yaml and overrides.yaml, each
    written aside and renamed in, so a full disk leaves the old record whole."""
    from hydra.core.hydra_config import HydraConfig

    out, tmp = run_dir / ".hydra", run_dir / ".hydra.tmp"
    task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    files = {"config.yaml": task, "hydra.yaml": HydraConfig.instance().cfg, "overrides.yaml": config.hydra.overrides.task}
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        for name, node in files.items():
            (tmp / name).write_text(OmegaConf.to_yaml(node))
        out.mkdir(exist_ok=True)
        for name in files:
            os.replace(tmp / name, out / name)
    finally:
        for name in files:
            (tmp / name).unlink(missing_ok=True)
        if tmp.exists():
            tmp.rmdir()


class RunLogHandler(logging.FileHandler):
    """run.log (conf/hydra/job_logging), opened at its first line. On a full disk it says so once, on the console,
    and stops writing, instead of printing a traceback for every line the run logs."""

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None):
        super().__init__(filename, mode, encoding, delay=True)
        self.full = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.full:
            super().emit(record)

    def close(self) -> None:
        try:
            super().close()
        except OSError as e:  # the lines still buffered when the disk filled up: said already, dropped
            if not is_no_space(e):
                raise

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not is_no_space(error):
            return super().handleError(record)
        self.full = True
        print(f"warning: no space left to write run.log in {Path(self.baseFilename).parent}: free disk space; "
              "the log goes on on the console only", file=sys.stderr)


def refuse(run_dir: Path, error: UserError) -> None:
    """Say why this job may not run in run_dir, without writing there (run.log is not opened), and exit 2."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).resolve().parent == run_dir:
            root.removeHandler(handler)
            handler.close()
    log.error("error: %s", error)
    raise SystemExit(2)
