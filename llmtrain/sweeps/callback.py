"""Sweeps: validate every job first, skip finished jobs and resume interrupted ones, record failures, summarize,
split threads between jobs.

Hydra imports this module at start-up (the callback in conf/config.yaml), so it stays free of torch and matplotlib.
"""
from __future__ import annotations

import logging
import math
import os
import shlex
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus, configure_log
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from llmtrain.runtime.rundir import read_status

log = logging.getLogger(__name__)

THREADS_KEY = "hardware.num_threads"


def finished_loss(run_dir: Path) -> float | None:
    """The final eval loss of a job that already completed in run_dir (a rerun of the sweep skips it), else None."""
    status = read_status(run_dir)
    if status.get("status") != "completed":
        return None
    log.info("already completed in %s: skipped (eval loss %s)", run_dir, status.get("eval_loss"))
    loss = status.get("eval_loss")
    return float(loss) if loss is not None else math.nan


def resumable(cfg: DictConfig) -> DictConfig:
    """In a sweep every job resumes from its own last checkpoint if it has one (a rerun into the same directory)."""
    if cfg.trainer.resume is None:
        cfg.trainer.resume = "auto"
    return cfg


def record_failure(run_dir: Path, error: BaseException) -> float:
    """Note a failed job in its run directory (traceback in run.log, metrics.json); sweepers see nan and go on."""
    log.error("job failed: %s", "".join(traceback.format_exception(error)).rstrip())
    _write_failure(run_dir, error)
    return math.nan


def _write_failure(run_dir: Path, error: BaseException) -> None:
    from llmtrain.training.tracking import write_status

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_status(run_dir, {"status": "failed", "error": f"{type(error).__name__}: {error}"})


def constant_keys(overrides: Sequence[str], sweeper_params: Sequence[str] = ()) -> list[str]:
    """Keys given one value on a sweep's command line (model=gpt2_tiny), as against swept ones (batch_size=8,16, or
    the sweeper's own `hydra.sweeper.params`); none when nothing is swept (a one-job multirun keeps its name)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    if not sweeper_params and not any(o.is_sweep_override() for o in parsed):
        return []
    return sorted({o.key_or_group for o in parsed if not o.is_sweep_override()} - set(sweeper_params))


def rerun_args(sweep_dir: str | Path) -> str:
    """What to add to a sweep's command to continue it: finished jobs are skipped, interrupted ones resume."""
    return shlex.quote(f"hydra.sweep.dir={os.path.abspath(sweep_dir)}")


# ---- every job validated before the first one trains ------------------------------------------------------------
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
# Launchers that run the jobs on this machine: only there are the device and precision checked before launch.
LOCAL_LAUNCHERS = ("BasicLauncher", "JoblibLauncher", "ParallelLauncher", "LocalLauncher")


def _sweep_arguments(config: DictConfig) -> list[str]:
    """The overrides a sweeper expands: its own `params`, then the command line's (as Hydra's sweepers do)."""
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    return [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)


def sweep_jobs(config: DictConfig) -> list[tuple[str, list[str]]]:
    """(name, overrides) of each job, in the order Hydra's basic sweeper launches them (job k is number k)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    jobs = [job for batch in BasicSweeper.split_arguments(parser.parse_overrides(_sweep_arguments(config)), None)
            for job in batch]
    varying = _varying_keys(jobs)
    return [(f"job {k} ({' '.join(o for o in job if o.split('=', 1)[0] in varying) or ' '.join(job)})", job)
            for k, job in enumerate(jobs)]


def search_probes(config: DictConfig) -> list[tuple[str, list[str]]]:
    """For an Optuna search, whose trials are proposed as it goes: trials at the edges of its space (every choice,
    both ends of every range; the other parameters at their low end), so a value no trial could use fails first."""
    logging.getLogger("alembic").setLevel(logging.WARNING)  # optuna's import of it logs each of its plugins
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from optuna.distributions import CategoricalDistribution, LogUniformDistribution, UniformDistribution

    space, fixed = create_params_from_overrides(_sweep_arguments(config))
    edges = {}
    for name, d in space.items():
        if name in fixed:
            continue
        if isinstance(d, CategoricalDistribution):
            edges[name] = list(d.choices)
        else:  # Optuna 2 draws a float from [low, high), an integer or a stepped float from [low, high]
            high = math.nextafter(d.high, d.low) if isinstance(d, (UniformDistribution, LogUniformDistribution)) \
                else d.high
            edges[name] = [d.low, high]
    base = [f"{k}={v}" for k, v in fixed.items()]
    probes = [tuple(f"{k}={v[0]}" for k, v in edges.items())]
    for name, values in edges.items():
        probes += [tuple(f"{k}={value if k == name else v[0]}" for k, v in edges.items()) for value in values[1:]]
    return [(f"a trial with {' '.join(p)}" if p else "every trial", [*base, *p]) for p in dict.fromkeys(probes)]


def job_problems(config: DictConfig, overrides: list[str], on_this_machine: bool) -> list[str]:
    """What validate() finds in one job's config, composed as its launcher will; [] when it is fine, or when it
    does not compose (Hydra's sweeper reports that itself, before any job runs)."""
    from hydra.core.global_hydra import GlobalHydra

    from llmtrain.config import validate
    from llmtrain.errors import ConfigError

    try:
        cfg = GlobalHydra.instance().config_loader().load_sweep_config(config, list(overrides))
    except Exception:  # noqa: BLE001
        return []
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]  # what the job's task function gets
    try:
        validate(cfg, on_this_machine=on_this_machine)
    except ConfigError as e:
        return e.problems
    return []


def check_jobs(config: DictConfig) -> None:
    """Validate every job of a basic sweep (the edges of an Optuna search); exit 2, naming each bad job and key,
    before any job runs. Other sweepers' jobs are validated as each starts."""
    sweeper = str(config.hydra.sweeper._target_)
    if sweeper != BASIC_SWEEPER and not sweeper.endswith("OptunaSweeper"):
        return
    started = time.perf_counter()
    on_this_machine = str(config.hydra.launcher._target_).endswith(LOCAL_LAUNCHERS)
    search = sweeper != BASIC_SWEEPER
    problems, seen, bad = [], set(), 0
    try:
        jobs = search_probes(config) if search else sweep_jobs(config)
        log.info("checking the configs of %s", f"{len(jobs)} trials at the edges of the search space" if search
                 else f"{len(jobs)} sweep jobs")
        for name, job in jobs:
            found = [p for p in job_problems(config, job, on_this_machine) if not (search and p in seen)]
            seen.update(found)  # a search's probes share most values: each problem once
            problems += [f"{name}: {p}" for p in found]
            bad += bool(found)
    except KeyboardInterrupt:
        print("interrupted while checking the sweep's jobs; none has run", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    log.debug("validated %d sweep jobs in %.1fs", len(jobs), time.perf_counter() - started)
    if problems:
        what = "the search space has values no trial can use" if search \
            else f"{bad} of {len(jobs)} sweep jobs have config problems"
        print(f"error: {what}; no job was run. Fix them and run the sweep again:\n"
              + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        raise SystemExit(2)  # SystemExit, because Hydra turns a callback's exceptions into warnings


def check_rerun(config: DictConfig) -> None:
    """A basic sweep rerun into its directory: each job that has a record there is checked against it (rundir.check)
    before any job runs, so no job's results are reported under settings they were not made with; exit 2 listing
    each job and key. Nothing in the sweep directory is written before (not even multirun.yaml)."""
    from hydra.core.global_hydra import GlobalHydra

    from llmtrain.runtime import rundir
    from llmtrain.errors import ConfigError

    if str(config.hydra.sweeper._target_) != BASIC_SWEEPER or not Path(config.hydra.sweep.dir).is_dir():
        return
    problems = []
    for num, (name, job) in enumerate(sweep_jobs(config)):
        cfg = GlobalHydra.instance().config_loader().load_sweep_config(config, list(job))
        with read_write(cfg), open_dict(cfg):
            cfg.hydra.job.num = num
        run_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
        old = rundir.recorded_settings(run_dir) if rundir.has_record(run_dir) else None
        if old is None:
            continue
        try:
            rundir.check(old, rundir.settings(cfg), f"{name}, {run_dir},")
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        print("error: " + "\n".join(problems) + "\nNo job was run. Or rerun the sweep into a new hydra.sweep.dir",
              file=sys.stderr)
        raise SystemExit(2)


def _varying_keys(jobs: list[list[str]]) -> set[str]:
    """Keys whose value differs between jobs (what names a job)."""
    values: dict[str, set[str]] = {}
    for job in jobs:
        for o in job:
            key, _, value = o.partition("=")
            values.setdefault(key, set()).add(value)
    return {k for k, v in values.items() if len(v) > 1}


class SweepSummary(Callback):
    """Checks every job's config before the first one runs; names job directories by what differs; keeps
    summary.{csv,md,png} in the sweep directory up to date; fails the sweep, at its end, if a job did.

    The summary is rewritten after every job, so it exists even when a sweep is killed. A job that failed returns
    nan (run.py) rather than raising, so the sweep runs every job and on_multirun_end is always reached.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_jobs(config)
        # Hydra names a job directory by all its task overrides; leave out those every job shares, so that
        # TensorBoard's run names show what differs (and stay short). The launcher composes each job from the
        # sweep's hydra overrides, so one appended here reaches every job.
        params = OmegaConf.select(config, "hydra.sweeper.params") or {}
        keys = constant_keys(list(config.hydra.overrides.task), list(params))
        if keys:
            exclude = [*config.hydra.job.config.override_dirname.exclude_keys, *keys]
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.overrides.hydra.append(
                    "hydra.job.config.override_dirname.exclude_keys=[" + ",".join(f"'{k}'" for k in exclude) + "]")
        check_rerun(config)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        run_dir = Path(config.hydra.runtime.output_dir)
        if job_return.status == JobStatus.FAILED and read_status(run_dir).get("status") != "failed":
            _write_failure(run_dir, job_return._return_value)  # raised outside run.py's own handling
        self._summarize(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)  # not the last job's run.log
        runs = self._summarize(Path(config.hydra.sweep.dir))
        bad = [r for r in runs if r.status != "completed"]
        if bad:
            # SystemExit, because Hydra turns a callback's exceptions into warnings
            raise SystemExit(f"{len(bad)} of {len(runs)} sweep jobs did not complete: " + "; ".join(
                f"{r.name} ({r.status}: {r.error or 'no metrics.json'})" for r in bad)
                + f". See {Path(config.hydra.sweep.dir) / 'summary.md'}")

    @staticmethod
    def _summarize(sweep_dir: Path) -> list:
        from llmtrain.sweeps.report import write_summary

        runs = write_summary(sweep_dir)
        log.info("sweep summary (%d runs): %s", len(runs), sweep_dir / "summary.md")
        return runs


# ---- parallel jobs on one machine -------------------------------------------------------------------------------
def available_cores() -> int:
    """Cores this process may use (its CPU affinity, which a container or SLURM allocation narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def plan_parallel(n_jobs: int, n_tasks: int, cores: int) -> tuple[int, int]:
    """(jobs side by side, threads per job) with jobs x threads <= cores; n_jobs < 0 counts back from the cores."""
    requested = cores + 1 + n_jobs if n_jobs < 0 else n_jobs  # joblib's convention: -1 = all cores
    jobs = max(1, min(requested, n_tasks, cores))
    return jobs, max(1, cores // jobs)


def sets_threads(overrides: Sequence[str]) -> bool:
    """Whether these overrides set hardware.num_threads themselves."""
    return any(o.lstrip("+~").startswith(f"{THREADS_KEY}=") for o in overrides)


def with_threads(overrides: Sequence[str], threads: int) -> list[str]:
    """A job's overrides with hardware.num_threads set, unless the user set it."""
    if sets_threads(overrides):
        return list(overrides)
    return [*overrides, f"{THREADS_KEY}={threads}"]
