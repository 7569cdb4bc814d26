"""Device, precision, threads: what the hardware group decides, detected rather than assumed."""
from __future__ import annotations

import contextlib
import logging
import random
import resource
from dataclasses import dataclass

import numpy as np
import psutil
import torch

from llmtrain.errors import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def cpu_has_native_bf16() -> bool:
    """True when the CPU runs bf16 matrix work natively (AVX512-BF16 or AMX); else bf16 is emulated and slow."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def compute_cores() -> int:
    """Cores this process may use (its CPU affinity), counting a core once when it has two hardware threads.

    Matrix kernels keep a core's vector units busy; a second thread on the same core only contends for them.
    """
    from llmtrain.sweeps.callback import available_cores

    allowed = available_cores()
    logical, physical = psutil.cpu_count() or allowed, psutil.cpu_count(logical=False) or allowed
    return max(1, allowed * physical // max(1, logical))


@dataclass
class Hardware:
    """The resolved hardware settings of a run."""

    device: str = "cpu"
    precision: str = "auto"
    compile: bool = False
    num_threads: int | None = None
    num_workers: int = 0
    distributed: bool = False
    nproc_per_node: int = 1
    timeout_s: int = 600

    def __post_init__(self) -> None:
        problems = []
        if self.device not in ("cpu", "cuda", "auto"):
            problems.append(f"hardware.device={self.device!r}: use cpu, cuda or auto")
        if self.precision not in PRECISIONS:
            problems.append(f"hardware.precision={self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.num_threads is not None and self.num_threads < 1:
            problems.append(f"hardware.num_threads={self.num_threads}: use a positive number or null (all cores)")
        if self.device == "cuda" and not torch.cuda.is_available():
            problems.append("hardware.device=cuda but no CUDA GPU is visible: use hardware=cpu or hardware.device=auto")
        if problems:
            raise ConfigError(problems)
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.precision == "auto":
            self.precision = self._auto_precision()
        if self.precision == "fp16" and self.device == "cpu":
            raise ConfigError("hardware.precision=fp16 is for CUDA; on a CPU use bf16 or fp32 (or auto)")

    def _auto_precision(self) -> str:
        if self.device == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the matrix products run in (what MFU compares against)."""
        return self.autocast_dtype or torch.float32

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for forward passes (a no-op in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=self.autocast_dtype)

    def setup(self, seed: int) -> None:
        """Seed every generator and size the thread pool to the cores (or hardware.num_threads)."""
        threads = self.num_threads or compute_cores()
        torch.set_num_threads(threads)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        log.info("hardware: device=%s precision=%s threads=%d compile=%s",
                 self.device, self.precision, threads, self.compile)


def quiet_libraries() -> None:
    """Our own progress bar and log lines are the run's output; silence the libraries' bars and chatter."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def peak_memory_mb() -> float:
    """Peak resident memory of this process (CUDA: peak allocated on the GPU as well)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rss = max(rss, torch.cuda.max_memory_allocated() / 2**20)
    return rss
