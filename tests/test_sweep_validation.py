"""A sweep checks every job's config before the first one trains; Ctrl-C then stops it with no traceback."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY_GPT, compose_cfg, run_cli
from llmtrain.config import validate
from llmtrain.errors import ConfigError
from llmtrain.runtime.rundir import read_status

TINY_SWEEP = [o for o in TINY_GPT if not o.startswith(("trainer.batch_size=", "trainer.max_steps="))]


def test_a_bad_value_in_a_later_job_fails_the_sweep_before_any_job_trains(tmp_path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = run_cli(["-m", *TINY_SWEEP, "trainer.max_steps=20", "trainer.batch_size=8,0", "optimizer.lr=1e-3,-1",
                      f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-3000:]
    assert "Traceback" not in out
    # every problem of every job, each naming the job (its number and what differs) and the key
    lr, batch = "optimizer.lr=-1: use a positive learning rate", "trainer.batch_size=0: use 1 or more"
    assert "3 of 4 sweep jobs have config problems" in result.stderr
    assert f"job 1 (trainer.batch_size=8 optimizer.lr=-1): {lr}" in result.stderr
    assert f"job 2 (trainer.batch_size=0 optimizer.lr=0.001): {batch}" in result.stderr
    assert f"job 3 (trainer.batch_size=0 optimizer.lr=-1): {batch}" in result.stderr
    assert f"job 3 (trainer.batch_size=0 optimizer.lr=-1): {lr}" in result.stderr
    assert "job 0 " not in result.stderr
    assert "model: gpt2" not in out  # job 0 was not even set up
    assert not sweep_dir.exists()  # nor its directory, nor the sweep's


def test_a_sweep_over_data_files_with_one_missing_fails_before_any_job_trains(tmp_path) -> None:
    (tmp_path / "corpus.txt").write_text("a line of text to train on\n" * 50)
    result = run_cli(["-m", *TINY_SWEEP, "data=text", "data.path=corpus.txt,missing.txt",
                      f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "job 1 (data.path=missing.txt): data.path=missing.txt: no such file or directory" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "sweep").exists()


def test_a_slurm_sweep_leaves_the_device_check_to_the_nodes() -> None:
    """Jobs that run on other machines are not checked against this one's devices before launch."""
    cfg = compose_cfg(["model=gpt2_tiny", "hardware=cuda"])
    validate(cfg, on_this_machine=False)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
            validate(cfg)


def test_ctrl_c_while_the_sweep_checks_its_jobs_exits_130_without_a_traceback(tmp_path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "llmtrain.run", "-m", *TINY_SWEEP, "trainer.max_steps=1",
                             "trainer.batch_size=1,2,3,4,5,6"],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "checking the configs of 6 sweep jobs" in line:
            break
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C does: to the whole process group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert "Traceback" not in out + err
    assert "interrupted while checking the sweep's jobs; none has run" in err


@pytest.mark.slow  # two short sweeps, each stopped and continued: ~1-2 minutes on 2 cores
@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=parallel"]], ids=["sequential", "parallel"])
def test_ctrl_c_stops_a_sweep_and_the_command_it_prints_completes_it(tmp_path, launcher: list[str]) -> None:
    overrides = ["-m", *launcher, *TINY_SWEEP, "trainer.max_steps=40", "trainer.log_every=1",
                 "trainer.eval_max_batches=4", "trainer.batch_size=4,8"]
    proc = subprocess.Popen([sys.executable, "-m", "llmtrain.run", *overrides], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not any(f.stat().st_size for f in tmp_path.glob("multirun/*/*/*/metrics.jsonl")):  # a job has trained
        assert proc.poll() is None and time.monotonic() < deadline, "no job started training"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C does: to the whole process group
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:] + err[-3000:]
    assert "Traceback" not in out + err
    (sweep_dir,) = tmp_path.glob("multirun/*/*")
    again = f"hydra.sweep.dir={sweep_dir}"
    assert out.rstrip().splitlines()[-1].endswith(f"To continue, run the same command with {again}"), out[-3000:]
    runs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    stopped = [r for r in runs if read_status(r).get("status") == "interrupted"]  # others had not begun training
    assert stopped and all(any((r / "checkpoints").glob("step-*")) for r in stopped)  # saved before it exited

    rerun = run_cli([*overrides, again], cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    runs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [r.name for r in runs] == ["0_trainer.batch_size=4", "1_trainer.batch_size=8"]
    for run in runs:
        metrics = (run / "metrics.json").read_text()
        assert '"status": "completed"' in metrics and '"steps": 40' in metrics
        assert rerun.stdout.count(f"outputs: {run}\n") == 1  # each job completed once, by the rerun
    for run in stopped:
        assert "resumed from" in (run / "run.log").read_text()


def test_an_optuna_search_with_values_no_trial_can_use_fails_before_any_trial(tmp_path) -> None:
    """Both ends of a range and every choice are checked; a float range's upper end is not drawn, so 1 is fine."""
    sweep_dir = tmp_path / "sweep"
    result = run_cli(["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", *TINY_SWEEP, "trainer.max_steps=20",
                      "optimizer.lr=interval(-1,0.001)", "trainer.batch_size=choice(8,0)",
                      "scheduler.warmup_ratio=interval(0,1)", f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-3000:]
    assert "Traceback" not in out
    assert "the search space has values no trial can use" in result.stderr
    problems = [line.split(": ", 1)[1] for line in result.stderr.splitlines() if line.startswith("  - a trial with")]
    assert sorted(p.split(":")[0] for p in problems) == ["optimizer.lr=-1.0", "trainer.batch_size=0"], problems
    assert not sweep_dir.exists()
