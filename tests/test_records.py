"""A run directory's record is the truth: one live run per directory, settings checked on every return (resume,
sweep rerun), a longer run's schedule continuous, and no record forked or repeated on any restart path."""
from __future__ import annotations

import hashlib
import json
import logging
import signal
from pathlib import Path

import pytest

from conftest import (TINY_GPT, logged_past, records, run_cli, scalars, start_slow_run, train_in_process,
                      wait_for)
from llmtrain.training import checkpoint
from llmtrain.errors import ConfigError

FAST = [*TINY_GPT, "hardware.num_threads=1", "trainer.log_every=2"]


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every file of a run directory, by its bytes."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def steps(run_dir: Path, kind: str) -> list[int]:
    return [r["step"] for r in records(run_dir, kind)]


def assert_each_step_once(run_dir: Path) -> None:
    """metrics.jsonl and TensorBoard (as its server reads the directory): no step of any curve twice."""
    for kind in ("train", "eval"):
        logged = steps(run_dir, kind)
        assert logged == sorted(set(logged)), (kind, logged)
    for tag, points in scalars(run_dir).items():
        at = [s for s, _ in points]
        assert at == sorted(set(at)), (tag, at)


def kill(proc) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


# ---- one live run per directory -------------------------------------------------------------------------------
def test_a_second_run_into_a_live_run_directory_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = start_slow_run([*FAST, "trainer.max_steps=30", "trainer.save_every=4"], run, tmp_path, after=4,
                           delay=5)  # alive for minutes: it is killed below
    try:
        wait_for(first, lambda: logged_past(run, 4) and (run / "checkpoints" / "last").exists())
        before = snapshot(run)
        for extra in ([], ["trainer.resume=auto"]):
            second = run_cli([*FAST, "trainer.max_steps=30", f"hydra.run.dir={run}", *extra], tmp_path)
            out = second.stdout + second.stderr
            assert second.returncode == 2, out[-2000:]
            assert f"{run} is in use by another run (pid {first.pid}" in out and "Traceback" not in out
        after = snapshot(run)  # the live run went on writing; the refused ones wrote nothing of theirs
        assert after[".hydra/config.yaml"] == before[".hydra/config.yaml"]
        assert "in use by another run" not in (run / "run.log").read_text()
    finally:
        kill(first)
    resumed = run_cli([*FAST, "trainer.max_steps=30", "trainer.save_every=4", f"hydra.run.dir={run}",
                       "trainer.resume=auto"], tmp_path)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    assert f"taking over the lock of a run that is no longer alive (pid {first.pid}" in out
    assert json.loads((run / "metrics.json").read_text())["steps"] == 30
    assert_each_step_once(run)
    assert (run / ".lock").read_text() == ""  # a run that ended leaves no holder behind


def test_a_new_run_into_a_directory_holding_a_run_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert run_cli([*FAST, "trainer.max_steps=2", f"hydra.run.dir={run}"], tmp_path).returncode == 0
    before = snapshot(run)
    again = run_cli([*FAST, "trainer.max_steps=2", f"hydra.run.dir={run}"], tmp_path)
    assert again.returncode == 2 and "already holds a run: continue it with trainer.resume=auto" in again.stdout
    assert snapshot(run) == before


# ---- the run's identity -----------------------------------------------------------------------------------------
def test_a_resume_with_other_settings_is_refused_listing_them_and_the_record_stays_as_it_was(tmp_path: Path) -> None:
    run = tmp_path / "run"
    base = [*FAST, "trainer.max_steps=4", "trainer.save_every=2", f"hydra.run.dir={run}"]
    assert run_cli(base, tmp_path).returncode == 0
    before = snapshot(run)
    refused = run_cli([*base, "trainer.resume=auto", "optimizer.lr=0.01", "seed=7", "data.max_length=32"], tmp_path)
    out = refused.stdout + refused.stderr
    assert refused.returncode == 2, out[-2000:]
    for change in ("optimizer.lr: 0.0005 -> 0.01", "seed: 42 -> 7", "data.max_length: 64 -> 32"):
        assert change in out, out
    assert "allow_changes=[data.max_length,data.seed,optimizer.lr,seed]" in out and "Traceback" not in out
    assert snapshot(run) == before  # .hydra/, run.log, metrics and checkpoints exactly as they were

    # cadence and threads may change; they are logged and recorded with the resume
    free = run_cli([*base, "trainer.resume=auto", "trainer.log_every=1", "hardware.num_threads=2"], tmp_path)
    assert free.returncode == 0, free.stdout[-2000:]
    assert "resuming with trainer.log_every: 2 -> 1" in free.stdout
    # a deliberate change goes through with allow_changes, and is recorded
    forced = run_cli([*base, "trainer.resume=auto", "optimizer.lr=0.01", "allow_changes=[optimizer.lr]"], tmp_path)
    assert forced.returncode == 0, forced.stdout[-2000:]
    lines = [json.loads(line) for line in (run / "config_changes.jsonl").read_text().splitlines()]
    assert lines[0]["changes"]["trainer.log_every"] == [2, 1] and lines[0]["allowed_by_allow_changes"] == []
    assert lines[1]["changes"]["optimizer.lr"] == [0.0005, 0.01]
    assert lines[1]["allowed_by_allow_changes"] == ["optimizer.lr"]


def test_a_checkpoint_of_another_run_carries_its_settings(tmp_path: Path) -> None:
    """Resuming from a checkpoint path (any directory) checks the settings stored in its trainer state."""
    first = tmp_path / "first"
    train_in_process([*FAST, "trainer.max_steps=4", "trainer.save_every=2"], first)
    with pytest.raises(ConfigError, match=r"(?s)checkpoint .*step-2 was made with other settings.*"
                                          r"optimizer.weight_decay: 0.01 -> 0.5"):
        train_in_process([*FAST, "trainer.max_steps=4", f"trainer.resume={first}/checkpoints/step-2",
                          "optimizer.weight_decay=0.5"], tmp_path / "second")
    with pytest.raises(ConfigError, match="past this run's end"):
        train_in_process([*FAST, "trainer.max_steps=1", f"trainer.resume={first}/checkpoints/step-2"],
                         tmp_path / "third")


def test_a_longer_run_stretches_the_rest_of_its_schedule(tmp_path: Path, caplog) -> None:
    """Killed at step 10 of 20 and resumed with max_steps=40: the learning rate goes on from where it was, falling
    along the old schedule's remaining shape stretched over steps 10-40, to the same end (linear, no warmup:
    lr(s) = lr0 * (20 - (10 + (s - 10) / 3)) / 20)."""
    first = tmp_path / "first"
    sched = ["scheduler.warmup_steps=0", "trainer.log_every=5"]
    train_in_process([*FAST, *sched, "trainer.max_steps=20", "trainer.save_every=10"], first)
    lr0 = 5e-4
    with caplog.at_level(logging.INFO):
        summary = train_in_process([*FAST, *sched, "trainer.max_steps=40", f"trainer.resume={first}/checkpoints/step-10"],
                                   tmp_path / "longer")
    assert summary["steps"] == 40
    assert any("stretched over steps 10-40" in m for m in caplog.messages), caplog.messages
    lrs = {r["step"]: r["lr"] for r in records(tmp_path / "longer", "train")}
    for s in (15, 25, 40):
        assert lrs[s] == pytest.approx(lr0 * (20 - (10 + (s - 10) / 3)) / 20, rel=1e-6, abs=1e-12), (s, lrs)


# ---- records never fork or repeat -------------------------------------------------------------------------------
def test_resume_auto_after_a_kill_before_the_first_checkpoint_clears_the_stale_records(tmp_path: Path) -> None:
    run = tmp_path / "run"
    overrides = [*FAST, "trainer.max_steps=12", "trainer.eval_every=0"]  # no best checkpoint either
    proc = start_slow_run(overrides, run, tmp_path, after=1, delay=0.3)
    try:
        wait_for(proc, lambda: logged_past(run, 6) and max(s for s, _ in scalars(run).get("train/loss", [(0, 0)])) >= 6)
    finally:
        kill(proc)
    assert not checkpoint.step_dirs(run / "checkpoints")
    resumed = run_cli([*overrides, f"hydra.run.dir={run}", "trainer.resume=auto"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "records of the run that stopped before its first checkpoint are cleared" in resumed.stdout
    assert steps(run, "train") == [2, 4, 6, 8, 10, 12] and steps(run, "eval") == [12]
    assert_each_step_once(run)
    assert [s for s, _ in scalars(run)["train/loss"]] == [2, 4, 6, 8, 10, 12]


def test_a_kill_while_model_is_written_does_not_repeat_the_final_evaluation(tmp_path: Path) -> None:
    run = tmp_path / "run"
    overrides = [*FAST, "trainer.max_steps=6", "trainer.eval_every=3"]
    proc = start_slow_run(overrides, run, tmp_path, after=100, env={"SLOW_MODEL_S": "60"})
    try:
        wait_for(proc, lambda: (run / ".tmp-model" / "config.json").exists() and
                 (run / "checkpoints" / "step-6").exists())
    finally:
        kill(proc)
    assert not (run / "model").exists()
    final = records(run, "eval")[-1]
    resumed = run_cli([*overrides, f"hydra.run.dir={run}", "trainer.resume=auto"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert steps(run, "eval") == [3, 6]  # the final evaluation once, the one made before the kill
    assert_each_step_once(run)
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["eval_loss"] == pytest.approx(final["loss"], rel=1e-12) and (run / "model").is_dir()


def test_an_early_stopped_run_resumed_stays_stopped(tmp_path: Path) -> None:
    """Early stopping is part of the record: resuming the stopped run neither trains on nor evaluates again."""
    overrides = [*FAST, "trainer.max_steps=40", "trainer.eval_every=2", "trainer.early_stopping.patience=1",
                 "trainer.early_stopping.min_delta=100"]
    first = train_in_process(overrides, tmp_path)
    assert first["early_stopped"] and first["steps"] == 4
    logged = records(tmp_path)
    again = train_in_process([*overrides, "trainer.resume=auto"], tmp_path)
    assert again["steps"] == 4 and again["eval_loss"] == first["eval_loss"]
    assert records(tmp_path) == logged


def test_a_sweep_rerun_with_other_settings_is_refused_and_a_longer_one_continues_its_jobs(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"

    def sweep(*changed: str) -> list[str]:
        settings = dict(o.split("=", 1) for o in [*FAST, "trainer.max_steps=2", "trainer.log_every=1", *changed])
        return ["-m", *(f"{k}={v}" for k, v in settings.items() if k != "trainer.batch_size"),
                f"hydra.sweep.dir={sweep_dir}", "trainer.batch_size=4,8"]

    assert run_cli(sweep(), tmp_path).returncode == 0
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0_trainer.batch_size=4", "1_trainer.batch_size=8"]
    before = snapshot(sweep_dir)
    refused = run_cli(sweep("optimizer.lr=0.001"), tmp_path)
    out = refused.stdout + refused.stderr
    assert refused.returncode == 2 and "optimizer.lr: 0.0005 -> 0.001" in out and "Traceback" not in out, out[-2000:]
    assert "already completed" not in out
    assert snapshot(sweep_dir) == before  # no job's record, nor the summary, rewritten under the new settings

    longer = run_cli(sweep("trainer.max_steps=4"), tmp_path)
    assert longer.returncode == 0, longer.stdout[-3000:]
    for job in jobs:
        assert json.loads((job / "metrics.json").read_text())["steps"] == 4
        assert steps(job, "train") == [1, 2, 3, 4]
        assert json.loads((job / "config_changes.jsonl").read_text())["changes"]["trainer.max_steps"] == [2, 4]
