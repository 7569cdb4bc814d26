"""Data-parallel runs on torch.distributed: one process per rank, gloo on CPUs, NCCL on GPUs.

Ranks come from torchrun's environment, or from `hardware.nproc_per_node` workers that one Hydra job launches
through torch's elastic launch API. Either way only rank 0 runs Hydra: it composes the config and decides the run
directory, and the other ranks train the jobs it hands them, so every rank writes into the one directory (and only
rank 0 writes at all).
"""
from __future__ import annotations

import atexit
import contextlib
import inspect
import itertools
import json
import logging
import logging.config
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel

from llmtrain.errors import ConfigError, UserError
from llmtrain.tasks import loss_terms

log = logging.getLogger(__name__)

JOB_WAIT_S = 600  # how long ranks > 0 wait for rank 0 to compose the first job (later: hardware.timeout_s)
_store: dist.Store | None = None
_published = 0  # jobs rank 0 has handed out


# ---- where this process stands ------------------------------------------------------------------------------
def launched() -> bool:
    """True in a process torchrun (or the elastic agent) started as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_follower() -> bool:
    """A torchrun rank > 0: it trains the jobs rank 0's Hydra composes instead of composing its own."""
    return launched() and int(os.environ.get("RANK", "0")) > 0


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_world_size() -> int:
    """Ranks on this machine (they share its cores)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def threads_per_rank(cores: int, ranks_here: int) -> int:
    """Intra-op threads for each of ranks_here processes on `cores` cores: ranks x threads <= cores."""
    return max(1, cores // max(1, ranks_here))


# ---- process group ------------------------------------------------------------------------------------------
def _env_store(timeout_s: float) -> dist.Store:
    """torchrun's key-value store (the agent's, or one rank 0 hosts), under a prefix of our own per restart."""
    global _store
    if _store is None:
        from torch.distributed.rendezvous import rendezvous

        store, _, _ = next(rendezvous("env://", timeout=timedelta(seconds=timeout_s)))
        _store = dist.PrefixStore(f"llmtrain/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    return _store


def init_process_group(device: str, timeout_s: float) -> None:
    """Join this process's ranks: gloo for CPU tensors, NCCL for CUDA ones; a collective waits at most timeout_s."""
    if dist.is_initialized():
        return
    backend = "gloo"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"  # small CPU-side collectives (flags, objects) stay off the GPU
    dist.init_process_group(backend, store=dist.PrefixStore("pg", _env_store(timeout_s)),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                            timeout=timedelta(seconds=timeout_s))
    atexit.register(teardown)
    log.info("distributed: %d ranks (%d on this machine), backend %s, collectives time out after %ds",
             world_size(), local_world_size(), backend, timeout_s)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (it fills the caches), then the others (they reuse what it wrote)."""
    if world_size() > 1 and rank() > 0:
        dist.barrier()
    try:
        yield
    finally:
        if world_size() > 1 and rank() == 0:
            dist.barrier()


# ---- what the Trainer asks --------------------------------------------------------------------------------
class TaskLoss(torch.nn.Module):
    """The model and its task's loss as one forward.

    DDP syncs only the gradients of a forward that ran through it; the sparse masked-LM head calls the model's
    submodules directly, so the whole loss, not the model, is what DDP wraps.
    """

    def __init__(self, model: torch.nn.Module, task: str):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return loss_terms(self.model, batch, self.task)


def wrap(model: torch.nn.Module, task: str, device: str) -> DistributedDataParallel:
    """DDP around model+loss (weights broadcast from rank 0); ranks > 0 reseed so dropout differs between ranks."""
    # the models' buffers are constants (position ids, masks): no broadcast before every forward
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                      inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
    ddp = DistributedDataParallel(TaskLoss(model, task),
                                  device_ids=[torch.cuda.current_device()] if device == "cuda" else None,
                                  gradient_as_bucket_view=True, **no_buffer_sync)
    reseed()
    return ddp


def reseed() -> None:
    """Ranks > 0 draw from their own stream (seed + rank); rank 0 keeps the single-process one."""
    if rank() > 0:
        torch.manual_seed(torch.initial_seed() + rank())


def agreed_signal(signum: int | None) -> int | None:
    """A signal any rank received, on every rank, so that all of them stop (and save) after the same step."""
    if world_size() == 1:
        return signum
    flag = torch.tensor([signum or 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag) or None


def gather(values: list) -> list:
    """Every rank's list, concatenated in rank order (e.g. per-example predictions for exact metrics)."""
    if world_size() == 1:
        return values
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, values)
    return [v for part in parts for v in part]


def resume_position(batch_in_epoch: int, old_world: int, old_batch: int, world: int, batch: int,
                    num_batches: int) -> int:
    """The per-rank batch index that continues an epoch saved at another world size or batch size.

    Rank r reads positions r::W of the epoch's permutation, so batch i of W ranks x B examples covers exactly
    positions [i*W*B, (i+1)*W*B) on any W: the examples consumed (not tokens, which cannot place a variable-length
    or short last example) carry over exactly, rounded down to a whole global batch.
    """
    return min(batch_in_epoch * old_world * old_batch // (world * batch), num_batches)


# ---- jobs: rank 0 composes, every rank trains ---------------------------------------------------------------
Train = Callable[[DictConfig, Path, str], dict]


def launch(train: Train, cfg: DictConfig, run_dir: Path, model_name: str) -> dict:
    """train(cfg, run_dir, model_name) here (one process), as rank 0 of a torchrun job, or on nproc_per_node
    workers; returns rank 0's summary."""
    hw = cfg.hardware
    if launched():
        if not hw.distributed:
            raise ConfigError(f"started by torchrun as one of {os.environ['WORLD_SIZE']} ranks, but "
                              "hardware.distributed=false: add hardware=ddp")
        job = {"cfg": OmegaConf.to_container(cfg, resolve=True), "run_dir": str(run_dir), "model_name": model_name}
        _publish(job, hw.timeout_s)
        return _train_rank(train, **job)
    if hw.distributed and hw.nproc_per_node > 1:
        return _spawn(train, cfg, run_dir, model_name)
    return train(cfg, run_dir, model_name)


def _train_rank(train: Train, cfg: dict, run_dir: str, model_name: str) -> dict:
    """What every rank runs for one job: threads, process group, then the ordinary training."""
    from llmtrain.sweep import available_cores

    config = OmegaConf.create(cfg)
    hw = config.hardware
    if hw.num_threads is None:
        hw.num_threads = threads_per_rank(available_cores(), local_world_size())
    device = hw.device if hw.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    init_process_group(device, hw.timeout_s)
    return train(config, Path(run_dir), model_name)


def _publish(job: dict | None, timeout_s: float) -> None:
    """Rank 0 hands the next job (None: no more) to the other ranks."""
    global _published
    _env_store(timeout_s).set(f"job/{_published}", json.dumps(job))
    _published += 1


def lead(main: Callable[[], object]) -> None:
    """Run Hydra's main as rank 0; however it ends, tell the other ranks there are no more jobs."""
    try:
        main()
    finally:
        if launched():
            _publish(None, JOB_WAIT_S)


@record
def follow(train: Train) -> int:
    """A torchrun rank > 0: train each job rank 0 publishes, into rank 0's run directory, until it says stop.
    Returns the exit status (an interrupt's, or 0)."""
    from llmtrain.trainer import Interrupted

    _console_logging(None)
    wait_s: float = JOB_WAIT_S
    code = 0
    for k in itertools.count():
        store = _env_store(wait_s)
        store.wait([f"job/{k}"], timedelta(seconds=wait_s))
        job = json.loads(store.get(f"job/{k}"))
        if job is None:
            return code
        wait_s = job["cfg"]["hardware"]["timeout_s"]
        try:
            _train_rank(train, **job)
        except UserError as e:  # rank 0 meets the same problem, reports it, and goes on to its next job, if any
            log.warning("rank %d: %s", rank(), e)
        except Interrupted as e:  # rank 0 saved the checkpoint; leave once it has written its records too
            code = e.code


# ---- N workers from inside one Hydra job ----------------------------------------------------------------------
def _spawn(train: Train, cfg: DictConfig, run_dir: Path, model_name: str) -> dict:
    """Launch nproc_per_node workers through torch's elastic agent and return rank 0's summary.

    A worker that fails makes the agent stop the others (no rank is left waiting on a dead peer); a user error
    or an interrupt in a worker comes back as the same exception here, so run.py reports it as in one process.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from llmtrain.config import validate
    from llmtrain.sweep import available_cores

    validate(cfg)  # fail here, once, rather than in every worker
    hw, n = instantiate(cfg.hardware), cfg.hardware.nproc_per_node
    if hw.device == "cuda" and n > torch.cuda.device_count():
        raise ConfigError(f"hardware.nproc_per_node={n} but {torch.cuda.device_count()} GPUs are visible: "
                          "use one process per GPU")
    job = OmegaConf.to_container(cfg, resolve=True)
    if cfg.hardware.num_threads is not None:  # this job's share of the cores (a parallel sweep), split between ranks
        job["hardware"]["num_threads"] = threads_per_rank(cfg.hardware.num_threads, n)
    else:
        job["hardware"]["num_threads"] = threads_per_rank(available_cores(), n)
    logging_cfg = (OmegaConf.to_container(HydraConfig.get().job_logging, resolve=True)
                   if HydraConfig.initialized() else None)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    # a failed worker is reported by the worker itself and summarized below, not also by the agent
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
            _reraise_from_workers(Path(tmp), run_dir, e)
            raise
        finally:
            for s, h in handlers.items():  # the agent leaves its own handlers installed
                signal.signal(s, h)


def _worker(train: Train, job: dict, run_dir: str, model_name: str, logging_cfg: dict | None, tmp: str) -> dict:
    """One spawned rank. A user error or an interrupt is noted for the parent and ends the process quietly."""
    from llmtrain.trainer import Interrupted

    _console_logging(logging_cfg if int(os.environ["RANK"]) == 0 else None)
    try:
        return _train_rank(train, job, run_dir, model_name)
    except (UserError, Interrupted) as e:
        if isinstance(e, Interrupted):  # rank 0 may still be saving: leave together
            with contextlib.suppress(Exception):
                dist.barrier()
        note = {"rank": int(os.environ["RANK"]), "message": str(e),
                "signal": e.code - 128 if isinstance(e, Interrupted) else None}
        Path(tmp, f"note-{note['rank']}.json").write_text(json.dumps(note))
        sys.exit(e.code if isinstance(e, Interrupted) else 2)
    except Exception:  # shown where it happened: the agent reports only the first rank it sees fail
        log.exception("rank %s failed", os.environ["RANK"])
        raise
    finally:
        teardown()


def _reraise_from_workers(tmp: Path, run_dir: Path, error: Exception) -> None:
    """Raise what the workers noted (the lowest rank's), or an Interrupted for a signal the agent got first."""
    from llmtrain import checkpoint
    from llmtrain.trainer import Interrupted

    notes = sorted((json.loads(p.read_text()) for p in tmp.glob("note-*.json")), key=lambda n: n["rank"])
    signum = notes[0]["signal"] if notes else getattr(error, "sigval", None)
    if signum is not None:
        saved = checkpoint.step_dirs(Path(run_dir) / "checkpoints")
        raise Interrupted(int(signum), run_dir if saved else None, saved[-1][0] if saved else None) from None
    if notes:
        raise UserError(notes[0]["message"]) from None
    if failures := _failures(tmp):
        raise RuntimeError("data-parallel worker failed: " + "; then ".join(failures)) from None


# a collective that broke because its peer died, or gave up waiting for it: a consequence, not the cause
CONSEQUENCES = ("Connection closed by peer", "Connection reset by peer", "DistBackendError", "Broken pipe")


def _failures(tmp: Path) -> list[str]:
    """'rank R: error' for every rank that left an error file (torch's elastic `record`), likely cause first."""
    found = []
    for path in tmp.glob("*/attempt_*/*/error.json"):
        error = json.loads(path.read_text())["message"]
        message = error["message"] if isinstance(error, dict) else str(error)
        stamp = int(error.get("extraInfo", {}).get("timestamp", 0)) if isinstance(error, dict) else 0
        found.append((any(c in message for c in CONSEQUENCES), stamp, int(path.parent.name), message))
    return [f"rank {r}: {message}" for _, _, r, message in sorted(found)]


def _console_logging(logging_cfg: dict | None) -> None:
    """Rank 0 logs as the Hydra job does (console and run.log); other ranks show only warnings and errors.
    The libraries stay as quiet as run.py makes them."""
    from llmtrain.run import quiet_libraries

    quiet_libraries()
    if logging_cfg:
        logging.config.dictConfig(logging_cfg)
    else:
        logging.basicConfig(level=logging.WARNING, format=f"[rank {os.environ.get('RANK', '?')}] %(message)s",
                            force=True)
