"""Data-parallel training on CPUs with gloo: the same math as one process, one run directory, resume across world
sizes, and a failing rank that takes the job down instead of leaving the other one waiting."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from conftest import ROOT, TINY_BERT, TINY_GPT, compose_cfg, records, run_cli, train_in_process
from llmtrain.training import checkpoint
from llmtrain.runtime import distributed
from llmtrain.data.module import DataModule

NO_DROPOUT_GPT = ["model.config.resid_pdrop=0.0", "model.config.embd_pdrop=0.0", "model.config.attn_pdrop=0.0"]
# 2 ranks on 2 cores, one thread each; a collective that waits a minute fails the test rather than hanging it
DDP = ["hardware=ddp", "hardware.nproc_per_node=2", "hardware.timeout_s=60"]

# Loaded by every Python process of a run (through PYTHONPATH), spawned ranks included: slows steps down, makes
# one rank fail, or reports every rank's parameter checksum at the end, as the environment asks.
HOOKS = """
import os
if os.environ.get("HOOK"):
    import json, time
    from llmtrain.runtime import distributed
    from llmtrain.training import trainer

    train_step, finish = trainer.Trainer.train_step, trainer.Trainer._finish

    def hooked_step(self, group):
        out = train_step(self, group)
        if os.environ["HOOK"] in ("crash", "hang") and self.rank == 1 and self.step == 3:
            if os.environ["HOOK"] == "crash":
                raise RuntimeError("injected failure on rank 1")
            time.sleep(3600)
        if os.environ["HOOK"] == "slow" and self.step > int(os.environ["SLOW_AFTER"]):
            time.sleep(0.3)
        return out

    def hooked_finish(self, *args):
        out = finish(self, *args)
        if os.environ["HOOK"] == "checksums":
            flat = __import__("torch").cat([p.detach().double().flatten() for p in self.model.parameters()])
            sums = distributed.gather([[float(flat.sum()), float(flat.square().sum())]])
            if self.is_main:
                with open(os.environ["CHECKSUMS"], "w") as f:
                    json.dump(sums, f)
        return out

    trainer.Trainer.train_step, trainer.Trainer._finish = hooked_step, hooked_finish
"""


def hooked_env(tmp_path: Path, **env: str) -> dict:
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(HOOKS)
    return {"PYTHONPATH": f"{hooks}{os.pathsep}{ROOT}", **env}


def test_two_ranks_of_8_follow_one_rank_of_16_into_one_run_directory(tmp_path: Path) -> None:
    """torchrun with 2 ranks x batch 8 (accumulating 2 micro-batches, so no_sync is in play) takes the same
    steps as 1 process x batch 16 from the same weights and data, and writes one run directory, one event file."""
    overrides = [*TINY_GPT, *NO_DROPOUT_GPT, "trainer.max_steps=6", "trainer.log_every=1", "trainer.grad_accum_steps=2"]
    one = train_in_process([*overrides, "trainer.batch_size=16", "hardware.num_threads=1"], tmp_path / "one")

    cwd = tmp_path / "two"
    cwd.mkdir()
    proc = run_cli(["--standalone", "--nproc_per_node=2", f"--log-dir={tmp_path / 'elastic'}", "-m", "llmtrain.run",
                    *overrides, *DDP, "trainer.batch_size=8"], cwd, timeout=400, module="torch.distributed.run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dirs = [p for p in (cwd / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs  # rank 1 composed nothing and resolved no directory of its own
    run = run_dirs[0]
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert len(list(cwd.rglob("metrics.jsonl"))) == 1 and len(list(cwd.rglob(".hydra"))) == 1

    got, want = records(run, "train"), records(tmp_path / "one", "train")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 7))
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]  # tokens counted over both ranks
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5, abs=1e-6), (g, w)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4), (g, w)
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)  # evaluation sharded, then reduced
    threads = distributed.threads_per_rank(len(os.sched_getaffinity(0)), 2)
    assert f"threads={threads}" in (run / "run.log").read_text()  # the cores split between the ranks


def test_masked_lm_replicas_stay_identical(tmp_path: Path) -> None:
    """DistilBERT's sparse MLM head runs inside DDP's forward: after steps on different data (and dropout, and
    accumulation), both ranks hold bit-identical weights, so gradients were synced; `hardware.nproc_per_node`
    spawns the ranks from the one Hydra job."""
    sums = tmp_path / "checksums.json"
    run = tmp_path / "run"
    proc = run_cli([*TINY_BERT, *DDP, "trainer.max_steps=4", "trainer.grad_accum_steps=2", f"hydra.run.dir={run}"],
                   tmp_path, timeout=400, env=hooked_env(tmp_path, HOOK="checksums", CHECKSUMS=str(sums)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = json.loads(sums.read_text())
    assert rank0 == rank1
    assert json.loads((run / "metrics.json").read_text())["status"] == "completed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checksums.json", "hooks", "run"]


@pytest.mark.slow
def test_interrupted_two_rank_run_resumes_and_moves_to_one_rank(tmp_path: Path) -> None:
    """SIGTERM to the job: both ranks stop after the same step and rank 0 saves; trainer.resume=auto continues it
    on 2 ranks; its 2 x 8 checkpoint then resumes on 1 rank x 16 at the same place in the data."""
    overrides = [*TINY_BERT, "trainer.max_steps=12", "trainer.save_every=4", "trainer.log_every=1",
                 "trainer.keep_last=0"]
    run = tmp_path / "run"
    env = {**os.environ, **hooked_env(tmp_path, HOOK="slow", SLOW_AFTER="5")}
    proc = subprocess.Popen([sys.executable, "-m", "llmtrain.run", *overrides, *DDP, f"hydra.run.dir={run}"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 400
        while not ((run / "metrics.jsonl").exists() and any(r["step"] >= 6 for r in records(run, "train"))):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the run never got to step 6"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    status = json.loads((run / "metrics.json").read_text())
    assert status["status"] == "interrupted" and "trainer.resume=auto" in status["error"]
    stopped = max(s for s, _ in checkpoint.step_dirs(run / "checkpoints"))
    assert stopped >= 6 and stopped < 12
    assert max(r["step"] for r in records(run, "train")) == stopped  # both ranks stopped after the same step

    proc = run_cli([*overrides, *DDP, f"hydra.run.dir={run}", "trainer.resume=auto"], tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [r["step"] for r in records(run, "train")] == list(range(1, 13))  # continued, no step twice
    assert json.loads((run / "metrics.json").read_text())["steps"] == 12

    moved = tmp_path / "one-rank"
    state = torch.load(run / "checkpoints" / "step-8" / checkpoint.STATE_FILE, weights_only=True)
    assert (state["world_size"], state["batch_size"]) == (2, 8)
    summary = train_in_process([*overrides, "trainer.batch_size=16", "hardware.num_threads=1",
                                f"trainer.resume={run}/checkpoints/step-8"], moved)
    assert summary["steps"] == 12
    assert [r["step"] for r in records(moved, "train")] == list(range(9, 13))
    assert [r["tokens"] for r in records(moved, "train")] == [r["tokens"] for r in records(run, "train")][8:]  # same global batches


def test_a_rank_that_fails_takes_the_job_down(tmp_path: Path) -> None:
    """An error on rank 1 ends the job at once, with that error shown; rank 0 is not left waiting for it."""
    started = time.monotonic()
    proc = run_cli([*TINY_GPT, *DDP, "trainer.max_steps=50", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path,
                   timeout=300, env=hooked_env(tmp_path, HOOK="crash"))
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stdout + proc.stderr
    assert time.monotonic() - started < 240
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.slow
def test_a_rank_that_hangs_times_out(tmp_path: Path) -> None:
    """Under torchrun, rank 1 stops answering: rank 0's next collective gives up after hardware.timeout_s, and the
    job ends with that error instead of waiting for ever."""
    started = time.monotonic()
    proc = run_cli(["--standalone", "--nproc_per_node=2", f"--log-dir={tmp_path / 'elastic'}", "-m", "llmtrain.run",
                    *TINY_GPT, *DDP, "hardware.timeout_s=10", "trainer.max_steps=50"], tmp_path, timeout=300,
                   module="torch.distributed.run", env=hooked_env(tmp_path, HOOK="hang"))
    assert proc.returncode != 0
    assert "timed out" in (proc.stdout + proc.stderr).lower(), proc.stderr[-3000:]
    assert time.monotonic() - started < 240


def test_resume_position_continues_with_the_same_examples(tmp_path: Path) -> None:
    """Global batch i of W ranks x B covers the same examples on any W, so a position saved at 2 x 8 resumes at
    1 x 16 (or 4 x 4) on exactly the examples that come next."""
    cfg = compose_cfg(TINY_GPT)
    data: DataModule = instantiate(cfg.data, _convert_="all")
    data.setup()

    def global_batch(i: int, world: int, batch: int) -> set[tuple]:
        rows = set()
        for rank in range(world):
            b = next(data.train_batches(batch, 0, i, rank, world))
            rows |= {tuple(r) for r in b["input_ids"].tolist()}
        return rows

    saved_at = 5  # 5 batches of 8 on each of 2 ranks consumed
    for world, batch in ((1, 16), (4, 4)):
        n = data.num_batches("train", batch, world)
        i = distributed.resume_position(saved_at, 2, 8, world, batch, n)
        assert i == 5
        assert global_batch(i, world, batch) == global_batch(saved_at, 2, 8)
    assert distributed.resume_position(7, 2, 8, 1, 32, 100) == 3  # a bigger global batch: from its start, not past
    assert distributed.resume_position(30, 2, 8, 1, 16, 30) == 30  # the end of an epoch stays the end


def test_threads_per_rank_fit_the_cores() -> None:
    assert distributed.threads_per_rank(16, 4) == 4
    assert distributed.threads_per_rank(2, 2) == 1
    assert distributed.threads_per_rank(2, 8) == 1  # never zero
