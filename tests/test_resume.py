"""Exact resume: a run killed with SIGKILL and resumed equals one that never stopped; checkpoints are crash-safe."""
from __future__ import annotations

import logging
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_BERT, assert_same_weights, TINY_GPT, logged_past, records, scalars, start_slow_run, train_in_process, wait_for
from llmtrain.training import checkpoint
from llmtrain.data.module import DataModule

# 479 training blocks / batch 8 = 60 micro-batches = 30 steps per epoch: 40 steps cross an epoch boundary,
# and the checkpoint at step 20 is mid-epoch. Dropout, masking and shuffling are all in play.
RESUME_RUN = [*TINY_BERT, "hardware.num_threads=1", "trainer.max_steps=40", "trainer.grad_accum_steps=2",
              "trainer.save_every=20", "trainer.eval_every=10", "trainer.log_every=5", "trainer.keep_last=0"]


def curve(run_dir: Path) -> list[tuple]:
    """Every logged record, without the wall-clock fields."""
    return [(r["kind"], r["step"], r["tokens"], r["loss"], r.get("lr"), r.get("grad_norm"), r.get("accuracy"))
            for r in records(run_dir)]


def assert_same_curve(got: list[tuple], want: list[tuple]) -> None:
    assert [r[:3] for r in got] == [r[:3] for r in want]  # same records in the same order: none lost, none twice
    for g, w in zip(got, want):
        for a, b in zip(g[3:], w[3:]):
            assert (a is None and b is None) or abs(a - b) <= 1e-6, (g, w)


@pytest.mark.slow
def test_kill_9_at_step_25_then_resume_equals_the_uninterrupted_run(tmp_path: Path, caplog) -> None:
    """40 steps in one go == 20 steps, SIGKILL a few steps later, resume=auto to 40: every logged value and the
    final fp32 weights agree to 1e-6; the killed run's records past the checkpoint don't fork or repeat the curves."""
    ref = tmp_path / "uninterrupted"
    train_in_process(RESUME_RUN, ref)

    run = tmp_path / "killed"
    proc = start_slow_run(RESUME_RUN, run, tmp_path, after=20)
    try:
        wait_for(proc, lambda: (run / "checkpoints" / "step-20" / checkpoint.STATE_FILE).exists()
                 and logged_past(run, 25) and max(s for s, _ in scalars(run).get("train/loss", [(0, 0)])) >= 25)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # the killed run got past its checkpoint: records (metrics.jsonl and TensorBoard) a resume must drop
    assert max(r["step"] for r in records(run)) >= 25
    assert max(s for s, _ in scalars(run)["train/loss"]) >= 25
    assert not (run / "checkpoints" / "step-30").exists() and not (run / "model").exists()

    with caplog.at_level(logging.INFO):
        summary = train_in_process([*RESUME_RUN, "trainer.resume=auto"], run)
    assert any("resumed from" in m and m.split()[2].endswith("step-20") for m in caplog.messages), caplog.messages
    assert summary["steps"] == 40

    assert_same_curve(curve(run), curve(ref))
    got, want = scalars(run), scalars(ref)
    for tag in ("train/loss", "train/lr", "eval/loss", "train_vs_tokens/loss", "eval_vs_tokens/loss"):
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag  # one point per step, no fork
        assert np.allclose([v for _, v in got[tag]], [v for _, v in want[tag]], rtol=0, atol=1e-6), tag
    assert_same_weights(run / "model", ref / "model")
    assert_same_weights(run / "checkpoints" / "last", ref / "checkpoints" / "last")


def test_resume_from_a_checkpoint_path_skips_consumed_batches(tmp_path: Path, monkeypatch) -> None:
    """trainer.resume=<checkpoints/step-N> (causal LM, accumulation, across an epoch) continues exactly, and builds
    only the batches it trains on: the data position is restored, not replayed."""
    overrides = [*TINY_GPT, "hardware.num_threads=1", "trainer.max_steps=40", "trainer.grad_accum_steps=2",
                 "trainer.log_every=5", "trainer.keep_last=0"]
    built: list[int] = []
    batch = DataModule._batch

    def counting(self, split, idx, seed):
        if split == "train":
            built.append(len(idx))
        return batch(self, split, idx, seed)

    monkeypatch.setattr(DataModule, "_batch", counting)
    first = tmp_path / "first"
    train_in_process([*overrides, "trainer.save_every=10"], first)
    ref = tmp_path / "ref"  # saving checkpoints must not change the trajectory either
    train_in_process(overrides, ref)
    assert_same_weights(first / "model", ref / "model")
    per_run = len(built) // 2
    state = torch.load(first / "checkpoints" / "step-40" / checkpoint.STATE_FILE, weights_only=True)
    assert state["epoch"] == 1 and state["batch_in_epoch"] > 0  # the run crossed into a second epoch

    built.clear()
    second = tmp_path / "second"
    summary = train_in_process([*overrides, f"trainer.resume={first}/checkpoints/step-10"], second)
    assert summary["steps"] == 40
    assert len(built) == per_run - 10 * 2  # the 20 micro-batches of steps 1-10 are not built again
    assert_same_weights(second / "model", ref / "model")
    assert [r for r in curve(ref) if r[1] > 10] == curve(second)


def test_rng_states_survive_a_weights_only_round_trip(tmp_path: Path) -> None:
    """torch, numpy and python random states saved in a checkpoint come back with torch.load(weights_only=True)."""
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.rand(3), np.random.rand(3), random.random(), np.random.randn()  # also a cached gaussian in numpy
    torch.save({"rng": checkpoint.rng_state()}, tmp_path / "state.pt")
    want = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], np.random.randn(3))
    checkpoint.set_rng_state(torch.load(tmp_path / "state.pt", weights_only=True)["rng"])
    got = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], np.random.randn(3))
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]
    assert np.array_equal(got[3], want[3])


def test_resume_auto_without_a_checkpoint_starts_fresh(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.INFO):
        s = train_in_process([*TINY_GPT, "hardware.num_threads=1", "trainer.max_steps=3", "trainer.resume=auto"],
                             tmp_path)
    assert s["steps"] == 3
    assert any("no checkpoint" in m for m in caplog.messages)


def test_resuming_a_finished_run_re_saves_the_same_step_safely(tmp_path: Path) -> None:
    """Resuming at the end re-writes step-N: the old copy is set aside, never deleted before the new one is in."""
    overrides = [*TINY_GPT, "hardware.num_threads=1", "trainer.max_steps=4"]
    train_in_process(overrides, tmp_path)
    before = load_file(tmp_path / "checkpoints" / "last" / "model.safetensors")
    s = train_in_process([*overrides, "trainer.resume=auto"], tmp_path)
    assert s["steps"] == 4
    ckpts = tmp_path / "checkpoints"
    assert os.readlink(ckpts / "last") == "step-4"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", "last", "step-4"]
    after = load_file(ckpts / "last" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_run_does_not_depend_on_what_is_cached(tmp_path: Path, monkeypatch) -> None:
    """A cold cache (tokenizer, packed data, measured peak FLOP/s all made now) and a warm one give the same run:
    work done only on a cache miss must not draw from the run's random streams."""
    monkeypatch.setenv("LLMTRAIN_CACHE", str(tmp_path / "cache"))
    overrides = [*TINY_GPT, "hardware.num_threads=1", "trainer.max_steps=5"]
    train_in_process(overrides, tmp_path / "cold")
    train_in_process(overrides, tmp_path / "warm")
    assert_same_weights(tmp_path / "cold" / "model", tmp_path / "warm" / "model")
