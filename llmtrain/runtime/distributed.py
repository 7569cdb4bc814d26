"""Data-parallel training on torch.distributed: the process group (gloo on CPUs, NCCL on GPUs, with timeouts) and
what the Trainer asks of it: DDP around model+loss, agreed stops, gathered predictions, the data position across
world sizes. How the ranks get started is llmtrain.runtime.workers."""
from __future__ import annotations

import atexit
import contextlib
import inspect
import logging
import os
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from llmtrain.training.losses import loss_terms

log = logging.getLogger(__name__)

_store: dist.Store | None = None


# ---- where this process stands ------------------------------------------------------------------------------
def launched() -> bool:
    """True in a process torchrun (or the elastic agent) started as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t summed over all ranks (t itself in a one-process run); on the CPU."""
    if world_size() > 1:
        t = t.to(device)
        dist.all_reduce(t)
        t = t.cpu()
    return t


def local_world_size() -> int:
    """Ranks on this machine (they share its cores)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def threads_per_rank(cores: int, ranks_here: int) -> int:
    """Intra-op threads for each of ranks_here processes on `cores` cores: ranks x threads <= cores."""
    return max(1, cores // max(1, ranks_here))


# ---- process group ------------------------------------------------------------------------------------------
def env_store(timeout_s: float) -> dist.Store:
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
    dist.init_process_group(backend, store=dist.PrefixStore("pg", env_store(timeout_s)),
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
