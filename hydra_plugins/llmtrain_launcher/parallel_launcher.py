"""`hydra/launcher=parallel`: joblib processes side by side, with the cores split so jobs x threads <= cores.

Hydra only loads launchers from the `hydra_plugins` package; the arithmetic lives in llmtrain.sweep.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher

from llmtrain.sweep import THREADS_KEY, available_cores, plan_parallel, sets_threads, with_threads

log = logging.getLogger(__name__)


class ParallelLauncher(JoblibLauncher):
    """The joblib launcher, run with min(n_jobs, jobs in the batch, cores) workers and hardware.num_threads set."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.requested_jobs = int(kwargs.get("n_jobs", -1))

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        cores = available_cores()
        jobs, threads = plan_parallel(self.requested_jobs, len(job_overrides), cores)
        if any(sets_threads(job) for job in job_overrides):
            log.warning("%s is set on the command line: %d jobs side by side may oversubscribe %d cores",
                        THREADS_KEY, jobs, cores)
        log.info("%d jobs side by side on %d cores, %d thread%s each", jobs, cores, threads, "s" if threads > 1 else "")
        self.joblib["n_jobs"] = jobs  # planned per batch: an Optuna sweep launches several
        return super().launch([with_threads(o, threads) for o in job_overrides], initial_job_idx)
