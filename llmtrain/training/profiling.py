"""trainer.profile=true: record a few training steps with torch.profiler into <run dir>/profile/.

The trace is Chrome-trace JSON (`*.pt.trace.json`), which TensorBoard's profiler plugin
(torch-tb-profiler: `tensorboard --logdir <run dir>`) and https://ui.perfetto.dev both open.
The top operators by self time are logged and written to profile/top_ops.txt.
"""
from __future__ import annotations

import logging
from pathlib import Path

from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

log = logging.getLogger(__name__)

# Skip one step (first-step allocations and lazy initialization would dominate), warm up one, record three.
WAIT, WARMUP, ACTIVE = 1, 1, 3
TOP_OPS = 15


class StepProfiler:
    """Profiles training steps WAIT + WARMUP + 1 .. WAIT + WARMUP + ACTIVE, then stops; call step() after each step."""

    def __init__(self, run_dir: Path, device: str):
        self.dir = Path(run_dir) / "profile"
        self.device = device
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        self.prof = profile(activities=activities, schedule=schedule(wait=WAIT, warmup=WARMUP, active=ACTIVE, repeat=1),
                            on_trace_ready=self._ready, record_shapes=True, profile_memory=True)
        self.steps = 0
        self.traced = False
        self.prof.start()
        log.info("profiling training steps %d-%d into %s", WAIT + WARMUP + 1, WAIT + WARMUP + ACTIVE, self.dir)

    def _ready(self, prof: profile) -> None:
        recorded = min(ACTIVE, self.steps - WAIT - WARMUP)
        if recorded <= 0:  # stopped before the first recorded step ended: nothing worth writing
            return
        tensorboard_trace_handler(str(self.dir), worker_name="trainer", use_gzip=False)(prof)
        sort_by = "self_cuda_time_total" if self.device == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort_by, row_limit=TOP_OPS)
        (self.dir / "top_ops.txt").write_text(table + "\n")
        log.info("top operators over %d profiled steps (by self time):\n%s", recorded, table)
        log.info("trace written to %s: open it with TensorBoard's profiler plugin or https://ui.perfetto.dev",
                 next(self.dir.glob("*.pt.trace.json"), self.dir))
        self.traced = True

    def step(self) -> None:
        if self.prof is None:
            return
        self.steps += 1
        self.prof.step()
        if self.steps >= WAIT + WARMUP + ACTIVE:
            self.close()

    def close(self) -> None:
        """Stop recording; a run shorter than the schedule still writes the steps it recorded."""
        if self.prof is None:
            return
        prof, self.prof = self.prof, None
        prof.stop()
        if not self.traced:
            log.warning("trainer.profile: the run ended after %d steps, before any step was recorded; profiling "
                        "needs at least %d steps", self.steps, WAIT + WARMUP + 1)


class NoProfiler:
    """trainer.profile=false."""

    def step(self) -> None:
        pass

    def close(self) -> None:
        pass


def step_profiler(enabled: bool, run_dir: Path, device: str) -> StepProfiler | NoProfiler:
    """A StepProfiler when trainer.profile is on (rank 0 only), else a no-op."""
    return StepProfiler(run_dir, device) if enabled else NoProfiler()

