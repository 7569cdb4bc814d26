"""Model FLOPs utilization (MFU): the FLOPs a training step executes, over the peak measured on this machine.

The FLOPs are counted from the architecture, as in the PaLM paper's MFU: 2 per weight per position for every matrix
product, plus the attention scores and weighted sums, and a backward pass twice the forward. "Executed" is literal:
padding positions count, and the masked-LM head counts only at the positions it runs on (see tasks.py). The peak is
the best rate of a large matrix product in the run's dtype with the run's threads, measured once and cached.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from llmtrain.training.losses import IGNORE, sparse_mlm_parts

log = logging.getLogger(__name__)

PEAK_VERSION = 1
PEAK_BUDGET_S = 1.5  # time spent measuring a peak, once per machine, dtype and thread count


def _matmul_weights(module: torch.nn.Module) -> int:
    """Weights of the matrix products in module: Linear layers and GPT-2's Conv1D (biases are not FLOPs of note)."""
    total = 0
    for m in module.modules():
        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D":
            total += m.weight.numel()
    return total


@dataclass
class FlopModel:
    """Matrix weights by where they run: at every position, in the head, or once per sequence."""

    body: int  # per position: the transformer stack
    head: int  # the LM head: at every position, or only at the targets on the sparse masked-LM path
    per_sequence: int  # pooler and classifier heads: once per sequence
    layers: int
    width: int
    sparse_head: bool

    @classmethod
    def of(cls, model: torch.nn.Module, task: str) -> FlopModel:
        base = getattr(model, "base_model", model)
        pooler = getattr(base, "pooler", None)
        pooled = _matmul_weights(pooler) if isinstance(pooler, torch.nn.Module) else 0
        body = _matmul_weights(base) - pooled
        outside = _matmul_weights(model) - _matmul_weights(base) if base is not model else 0
        cfg = model.config
        head, per_seq = (0, outside + pooled) if task == "cls" else (outside, pooled)
        return cls(body=body, head=head, per_sequence=per_seq, layers=int(cfg.num_hidden_layers),
                   width=int(cfg.hidden_size),
                   sparse_head=task == "mlm" and sparse_mlm_parts(model) is not None)

    def forward_flops(self, batch: int, length: int, head_positions: int) -> float:
        positions = batch * length
        attention = 4 * self.layers * self.width * length * positions  # Q K^T and softmax(.) V, 2 FLOPs per MAC
        return float(2 * (self.body * positions + self.head * head_positions + self.per_sequence * batch) + attention)

    def train_flops(self, batch: dict[str, torch.Tensor]) -> float:
        """FLOPs of one forward and backward pass over this batch (backward = 2 x forward)."""
        b, t = batch["input_ids"].shape
        if self.sparse_head:
            head_positions = int((batch["labels"] != IGNORE).sum())
        else:
            head_positions = b * t
        return 3 * self.forward_flops(b, t, head_positions)


# ---- the measured peak ----------------------------------------------------------------------------------------
def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_peak(device: str, dtype: torch.dtype, budget_s: float = PEAK_BUDGET_S) -> tuple[float, int]:
    """(best FLOP/s, matrix size): square matrix products grown until one takes 0.2 s, then repeated for budget_s."""
    def run(n: int) -> float:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        torch.mm(a, b)  # warm-up: kernel selection, page faults
        sync()
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        return time.perf_counter() - t

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    n, largest = 256, 8192 if device == "cuda" else 2048  # 2048: 48 MB of matrices, near peak on CPUs
    with torch.no_grad():
        while n < largest and run(n) < 0.2:
            n *= 2
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        best, deadline = float("inf"), time.perf_counter() + budget_s
        while time.perf_counter() < deadline or best == float("inf"):
            sync()
            t = time.perf_counter()
            torch.mm(a, b)
            sync()
            best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best, n


def peak_flops(device: str, dtype: torch.dtype, cache_dir: str | Path, refresh: bool = False) -> float:
    """The measured peak FLOP/s for (this machine, device, dtype, threads, torch), from the cache or measured now."""
    threads = torch.get_num_threads()
    key = f"v{PEAK_VERSION}|{device}|{device_name(device)}|{str(dtype).removeprefix('torch.')}|threads={threads}|" \
          f"torch={torch.__version__}"
    path = Path(os.path.expanduser(str(cache_dir))) / "peak_flops.json"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache and not refresh:
        return float(cache[key]["flops"])
    flops, n = measure_peak(device, dtype)
    if key in cache and cache[key]["flops"] > flops:  # the machine was busier this time: the peak is the best seen
        flops, n = float(cache[key]["flops"]), cache[key]["size"]
    log.info("peak %s matrix-product rate on this machine: %.3g TFLOP/s (%dx%d, %d threads; cached in %s)",
             str(dtype).removeprefix("torch."), flops / 1e12, n, n, threads, path)
    cache[key] = {"flops": flops, "size": n, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(cache, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as e:  # a read-only or full cache only costs the measurement next time
        tmp.unlink(missing_ok=True)
        log.warning("could not cache the peak FLOP/s in %s: %s", path, e)
    return flops


class MFUMeter:
    """Counts the FLOPs of the batches trained on; mfu(seconds) is their rate over the measured peak."""

    def __init__(self, model: torch.nn.Module, task: str, device: str, dtype: torch.dtype, cache_dir: str | Path):
        self.flop_model = FlopModel.of(model, task)
        self.device, self.dtype, self.cache_dir = device, dtype, cache_dir
        self.peak = peak_flops(device, dtype, cache_dir)
        self.window = self.total = 0.0
        self.remeasured = self.warned = False

    def add(self, batches: list[dict[str, torch.Tensor]]) -> None:
        flops = sum(self.flop_model.train_flops(b) for b in batches)
        self.window += flops
        self.total += flops

    def window_mfu(self, seconds: float) -> float:
        """MFU since the last call (the logging window), then start a new window."""
        rate, self.window = self.window / max(seconds, 1e-9), 0.0
        if rate > self.peak and not self.remeasured:
            # The cached peak was measured while other processes loaded the machine: measure it again, once (the
            # cache keeps the best rate seen), so that this run's MFU is against what the machine really does.
            self.remeasured = True
            log.info("this run executes %.3g TFLOP/s, above the cached peak %.3g: measuring the peak again",
                     rate / 1e12, self.peak / 1e12)
            self.peak = peak_flops(self.device, self.dtype, self.cache_dir, refresh=True)
        if rate > self.peak and not self.warned:
            self.warned = True
            log.warning("MFU %.0f%%: the peak FLOP/s, measured again, is still below this run's rate; the machine's "
                        "load varies", 100 * rate / self.peak)
        return rate / self.peak

    def run_mfu(self, seconds: float) -> float:
        return self.total / max(seconds, 1e-9) / self.peak


def seconds_since_process_start() -> float:
    """Wall time since this process was created: the start-up cost a user waits through before training."""
    return time.time() - psutil.Process().create_time()
