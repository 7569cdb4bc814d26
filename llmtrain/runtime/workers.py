"""Starting the ranks of a data-parallel job, with one run directory for all of them.

Ranks come from torchrun, or from `hardware.nproc_per_node` workers that one Hydra job launches through torch's
elastic launch API (so `-m` sweeps of data-parallel runs work). Either way only one process runs Hydra: it composes
the config and decides the run directory (Hydra would resolve a different `${now:...}` in every rank), and the
ranks train the jobs it hands them; only rank 0 writes into that directory.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import logging.config
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from llmtrain.runtime import distributed
from llmtrain.errors import ConfigError, UserError

log = logging.getLogger(__name__)

Train = Callable[[DictConfig, Path, str], dict]
JOB_WAIT_S = 600  # how long ranks > 0 wait for rank 0 to compose the first job (later: hardware.timeout_s)
# a collective that broke because its peer died: a consequence of another rank's failure, not its cause
CONSEQUENCES = ("Connection closed by peer", "Connection reset by peer", "DistBackendError", "Broken pipe")
_published = 0  # jobs rank 0 has handed out
_lead_pid: int | None = None


def is_follower() -> bool:
    """A torchrun rank > 0: it trains the jobs rank 0's Hydra composes instead of composing its own."""
    return distributed.launched() and int(os.environ.get("RANK", "0")) > 0


def launch(train: Train, cfg: DictConfig, run_dir: Path, model_name: str) -> dict:
    """train(cfg, run_dir, model_name) here (one process), as rank 0 of a torchrun job, or on nproc_per_node
    spawned workers; returns rank 0's summary."""
    hw = cfg.hardware
    if distributed.launched():
        if not hw.distributed:
            raise ConfigError(f"started by torchrun as one of {os.environ['WORLD_SIZE']} ranks, but "
                              "hardware.distributed=false: add hardware=ddp")
        if os.getpid() != _lead_pid:
            raise ConfigError("under torchrun the ranks train a sweep's jobs one after another: drop "
                              "hydra/launcher=parallel (or start the ranks with hardware.nproc_per_node instead)")
        job = {"cfg": OmegaConf.to_container(cfg, resolve=True), "run_dir": str(run_dir), "model_name": model_name}
        _publish(job, hw.timeout_s)
        return _train_rank(train, **job)
    if hw.distributed and hw.nproc_per_node > 1:
        return _spawn(train, cfg, run_dir, model_name)
    return train(cfg, run_dir, model_name)


def _train_rank(train: Train, cfg: dict, run_dir: str, model_name: str) -> dict:
    """What every rank runs for one job: its share of the cores, the process group, then the ordinary training."""
    from llmtrain.sweeps.callback import available_cores

    config = OmegaConf.create(cfg)
    hw = config.hardware
    if hw.num_threads is None:
        hw.num_threads = distributed.threads_per_rank(available_cores(), distributed.local_world_size())
    device = hw.device if hw.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    distributed.init_process_group(device, hw.timeout_s)
    return train(config, Path(run_dir), model_name)


# ---- under torchrun: rank 0 runs Hydra, the others follow ---------------------------------------------------
def _publish(job: dict | None, timeout_s: float) -> None:
    """Rank 0 hands the next job (None: no more) to the other ranks, through torchrun's store."""
    global _published
    distributed.env_store(timeout_s).set(f"job/{_published}", json.dumps(job))
    _published += 1


def lead(main: Callable[[], object]) -> None:
    """Run Hydra's main (as rank 0 under torchrun); however it ends, tell the other ranks there are no more jobs."""
    global _lead_pid
    _lead_pid = os.getpid()
    try:
        main()
    finally:
        if distributed.launched():
            _publish(None, JOB_WAIT_S)


def follow(train: Train) -> int:
    """A torchrun rank > 0: train each job rank 0 publishes, into rank 0's run directory, until it says stop.
    Returns the exit status (an interrupt's, or 0); an error ends the process (torchrun then stops the others)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_follow)(train)


def _follow(train: Train) -> int:
    from llmtrain.training.trainer import Interrupted

    _worker_logging(None)
    wait_s: float = JOB_WAIT_S
    code = 0
    for k in itertools.count():
        store = distributed.env_store(wait_s)
        store.wait([f"job/{k}"], timedelta(seconds=wait_s))
        job = json.loads(store.get(f"job/{k}"))
        if job is None:
            return code
        wait_s = job["cfg"]["hardware"]["timeout_s"]
        try:
            _train_rank(train, **job)
        except UserError as e:  # rank 0 meets the same problem, reports it, and goes on to its next job, if any
            log.warning("rank %d: %s", distributed.rank(), e)
        except Interrupted as e:  # rank 0 saved the checkpoint; leave once it has written its records too
            code = e.code
    raise AssertionError("unreachable")


# ---- hardware.nproc_per_node: workers launched from inside one Hydra job -------------------------------------
def _spawn(train: Train, cfg: DictConfig, run_dir: Path, model_name: str) -> dict:
    """Launch nproc_per_node workers through torch's elastic agent and return rank 0's summary.

    A worker that fails makes the agent stop the others (no rank is left waiting on a dead peer); a user error
    or an interrupt in a worker comes back here as the same exception, so run.py reports it as for one process.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from llmtrain.config import validate
    from llmtrain.sweeps.callback import available_cores

    validate(cfg)  # fail here, once, rather than in every worker
    hw, n = instantiate(cfg.hardware), cfg.hardware.nproc_per_node
    if hw.device == "cuda" and n > torch.cuda.device_count():
        raise ConfigError(f"hardware.nproc_per_node={n} but {torch.cuda.device_count()} GPUs are visible: "
                          "use one process per GPU")
    job = OmegaConf.to_container(cfg, resolve=True)
    # the job's threads (all cores, or its share in a parallel sweep) are split between its ranks
    job["hardware"]["num_threads"] = distributed.threads_per_rank(cfg.hardware.num_threads or available_cores(), n)
    logging_cfg = (OmegaConf.to_container(HydraConfig.get().job_logging, resolve=True)
                   if HydraConfig.initialized() else None)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    # a failed worker reports itself, and _reraise summarizes: the agent need not print it a third time
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with tempfile.TemporaryDirectory(prefix="llmtrain-ddp-") as tmp:
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=f"llmtrain-{uuid.uuid4().hex[:8]}",
                              rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                              logs_specs=DefaultLogsSpecs(log_dir=tmp))
        log.info("data-parallel: %d workers on this machine, %d threads each", n, job["hardware"]["num_threads"])
        try:
            return elastic_launch(config, _worker)(train, job, str(run_dir), model_name, logging_cfg, tmp)[0]
        except (ChildFailedError, SignalException) as e:
            _reraise(Path(tmp), run_dir, e)
            raise
        finally:
            for s, h in handlers.items():  # the agent leaves its own handlers installed
                signal.signal(s, h)


def _worker(train: Train, job: dict, run_dir: str, model_name: str, logging_cfg: dict | None, tmp: str) -> dict:
    """One spawned rank. A user error or an interrupt is noted for the parent and ends the process quietly."""
    from llmtrain.training.trainer import Interrupted

    rank = int(os.environ["RANK"])
    _worker_logging(logging_cfg if rank == 0 else None)
    try:
        return _train_rank(train, job, run_dir, model_name)
    except (UserError, Interrupted) as e:
        if isinstance(e, Interrupted):  # rank 0 may still be saving the checkpoint: leave together
            with contextlib.suppress(Exception):
                dist.barrier()
        note = {"rank": rank, "message": str(e), "signal": e.code - 128 if isinstance(e, Interrupted) else None}
        Path(tmp, f"note-{rank}.json").write_text(json.dumps(note))
        sys.exit(e.code if isinstance(e, Interrupted) else 2)
    except Exception:  # shown where it happened: the agent reports only the first rank it sees fail
        log.exception("rank %d failed", rank)
        raise
    finally:
        distributed.teardown()


def _reraise(tmp: Path, run_dir: Path, error: Exception) -> None:
    """Raise what the workers noted (the lowest rank's), an Interrupted for a signal the agent got first, or each
    failed rank's error, the likely cause first."""
    from llmtrain.training import checkpoint
    from llmtrain.training.trainer import Interrupted

    notes = sorted((json.loads(p.read_text()) for p in tmp.glob("note-*.json")), key=lambda n: n["rank"])
    signum = notes[0]["signal"] if notes else getattr(error, "sigval", None)
    if signum is not None:
        saved = checkpoint.step_dirs(Path(run_dir) / "checkpoints")
        raise Interrupted(int(signum), run_dir if saved else None, saved[-1][0] if saved else None) from None
    if notes:
        raise UserError(notes[0]["message"]) from None
    found = []
    for path in tmp.glob("*/attempt_*/*/error.json"):  # written by torch's elastic `record` in each worker
        error_info = json.loads(path.read_text())["message"]
        message = error_info["message"] if isinstance(error_info, dict) else str(error_info)
        stamp = int(error_info.get("extraInfo", {}).get("timestamp", 0)) if isinstance(error_info, dict) else 0
        found.append((any(c in message for c in CONSEQUENCES), stamp, int(path.parent.name), message))
    if found:
        raise RuntimeError("data-parallel worker failed: " + "; then ".join(
            f"rank {r}: {message}" for _, _, r, message in sorted(found))) from None


def _worker_logging(logging_cfg: dict | None) -> None:
    """Rank 0 logs as the Hydra job does (console and run.log); other ranks show only warnings and errors.
    The libraries stay as quiet as run.py makes them."""
    from llmtrain.runtime.hardware import quiet_libraries

    quiet_libraries()
    if logging_cfg:
        logging.config.dictConfig(logging_cfg)
    else:
        logging.basicConfig(level=logging.WARNING, format=f"[rank {os.environ.get('RANK', '?')}] %(message)s",
                            force=True)
