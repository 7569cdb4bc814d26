"""`hydra/launcher=parallel`: joblib processes side by side, with the cores split so jobs x threads <= cores.
Ctrl-C stops the sweep as it stops a run: each running job saves a checkpoint, then the sweep exits 130 with the
command that continues it.

Hydra only loads launchers from the `hydra_plugins` package; the arithmetic lives in llmtrain.sweeps.callback.
"""
from __future__ import annotations

import logging
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra_plugins.hydra_joblib_launcher._core import execute_job, process_joblib_cfg
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
from joblib import Parallel, delayed
from joblib.externals.loky.process_executor import TerminatedWorkerError

from llmtrain.sweeps.callback import THREADS_KEY, available_cores, plan_parallel, rerun_args, sets_threads, with_threads

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
        job_overrides = [with_threads(o, threads) for o in job_overrides]
        if jobs == 1:  # joblib runs the jobs here, one after another: Ctrl-C is the job's, as in a plain sweep
            return super().launch(job_overrides, initial_job_idx)
        return self._launch_side_by_side(job_overrides, initial_job_idx)

    def _launch_side_by_side(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
        """hydra_joblib_launcher's launch, but a Ctrl-C (which reaches every process of the terminal's group)
        neither starts more jobs nor lets joblib kill the running ones while they save their checkpoint."""
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # loky as in the joblib launcher; jobs handed out one per free worker, none queued, so none starts late
        joblib_cfg = {**self.joblib, "backend": "loky", "pre_dispatch": "n_jobs", "batch_size": 1}
        process_joblib_cfg(joblib_cfg)
        log.info("Launching %d jobs in %s", len(job_overrides), sweep_dir)
        for idx, overrides in enumerate(job_overrides):
            log.info("\t#%d : %s", initial_job_idx + idx, " ".join(filter_overrides(overrides)))

        stopped: list[int] = []

        def on_signal(signum: int, frame: Any) -> None:
            if not stopped:
                log.warning("%s received: waiting for the running jobs to save a checkpoint; no more are started",
                            signal.Signals(signum).name)
            stopped.append(signum)

        def tasks():
            singleton_state = Singleton.get_state()
            for idx, overrides in enumerate(job_overrides):
                if stopped:
                    return
                yield delayed(_execute_job)(initial_job_idx + idx, overrides, self.hydra_context, self.config,
                                            self.task_function, singleton_state)

        previous = signal.signal(signal.SIGINT, on_signal)
        try:
            runs = Parallel(**joblib_cfg, initializer=_ignore_sigint)(tasks())
        except TerminatedWorkerError:  # a worker got Ctrl-C before it could ignore it
            if not stopped:
                raise
            runs = []
        finally:
            signal.signal(signal.SIGINT, previous)
        codes = [r._return_value.code for r in runs if r.status == JobStatus.FAILED
                 and isinstance(r._return_value, SystemExit) and r._return_value.code > 128]  # by a signal
        if stopped or codes:
            name = signal.Signals(stopped[0] if stopped else codes[0] - 128).name
            log.error("sweep stopped by %s: %d job%s interrupted, %d not started. To continue, run the same command "
                      "with %s", name, len(codes), "" if len(codes) == 1 else "s", len(job_overrides) - len(runs),
                      rerun_args(sweep_dir))
            raise SystemExit(codes[0] if codes else 128 + stopped[0])
        return runs


def _ignore_sigint() -> None:
    """In a worker between jobs, Ctrl-C is the launcher's: an idle worker that died of it would break the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _execute_job(idx: int, overrides: Sequence[str], *args: Any) -> JobReturn:
    """One job in a worker. A job stopped by Ctrl-C (run.py exits 130 once its checkpoint is saved) is returned,
    not raised, so that joblib does not abort the jobs still saving theirs."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return execute_job(idx, overrides, *args)
    except (SystemExit, KeyboardInterrupt) as e:
        code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 128 + signal.SIGINT
        if code <= 128:
            raise  # not an interrupt: as joblib would
        return JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=SystemExit(code))
    finally:
        _ignore_sigint()
