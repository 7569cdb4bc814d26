"""Faults during a run: non-finite losses, kills during checkpoint writes, signals, early stopping, and loading
only what is safe (weights_only checkpoints, remote code only when trusted). A full disk: test_disk.py."""
from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import (ROOT, TINY_BERT, TINY_GPT, build, compose_cfg, logged_past, records, run_main, start_slow_run,
                      train_in_process, wait_for)
from llmtrain.training import checkpoint, trainer as trainer_mod
from llmtrain.config import validate
from llmtrain.errors import ConfigError, UserError
from llmtrain.training.trainer import Trainer

FAST = ["hardware.num_threads=1"]


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


class InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss whose gradient overflows."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def poison(monkeypatch, steps: set[int] | None, how: str) -> None:
    """Make the loss (or only its gradient) non-finite at the given training steps (None = every step)."""
    real = trainer_mod.loss_terms
    state = {"step": 0}
    train_step = Trainer.train_step

    def step(self, group):
        state["step"] = self.step + 1
        return train_step(self, group)

    def loss_terms(model, batch, task):
        loss, n, correct = real(model, batch, task)
        if model.training and (steps is None or state["step"] in steps):
            loss = loss * float("nan") if how == "loss" else InfGrad.apply(loss)
        return loss, n, correct

    monkeypatch.setattr(Trainer, "train_step", step)
    monkeypatch.setattr(trainer_mod, "loss_terms", loss_terms)


# -- non-finite losses and gradients ----------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["loss", "gradient"])
def test_a_non_finite_step_is_skipped_counted_and_logged(tmp_path: Path, monkeypatch, caplog, how: str) -> None:
    poison(monkeypatch, {3, 4}, how)
    t = build([*TINY_GPT, *FAST, "trainer.max_steps=8", "trainer.log_every=1"], tmp_path)
    snapshots = {}
    train_step = Trainer.train_step

    def snapshot(self, group):
        out = train_step(self, group)
        snapshots[self.step] = weights(self.model)
        return out

    monkeypatch.setattr(Trainer, "train_step", snapshot)
    summary = t.fit()
    assert summary["skipped_steps"] == 2 and summary["steps"] == 8
    assert same(snapshots[2], snapshots[3]) and same(snapshots[3], snapshots[4])  # no update at steps 3 and 4
    assert not same(snapshots[4], snapshots[5])  # training goes on
    assert sum(f"non-finite {how}" in m and "skipped" in m for m in caplog.messages) == 2
    logged = {r["step"]: r for r in records(tmp_path) if r["kind"] == "train"}
    assert "skipped_steps" not in logged[2] and logged[3]["skipped_steps"] == 1 and logged[8]["skipped_steps"] == 2
    assert all(torch.isfinite(v).all() for v in load_file(tmp_path / "model" / "model.safetensors").values())


def test_max_bad_steps_in_a_row_stop_the_run_with_advice(tmp_path: Path, monkeypatch) -> None:
    poison(monkeypatch, None, "loss")
    t = build([*TINY_BERT, *FAST, "trainer.max_steps=20", "trainer.max_bad_steps=3"], tmp_path)
    before = weights(t.model)
    with pytest.raises(UserError) as e:
        t.fit()
    message = str(e.value)
    assert "3 steps in a row" in message and "trainer.max_bad_steps=3" in message
    assert "optimizer.lr" in message and "trainer.max_grad_norm" in message
    assert same(before, weights(t.model))  # no update was applied
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "model").exists()


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_weights_that_overflow_are_never_checkpointed(tmp_path: Path) -> None:
    """An update that leaves a weight infinite (as an overflow in low precision can): the next save refuses with
    advice, and `last` stays on the previous, finite checkpoint."""
    t = build([*TINY_GPT, *FAST, "trainer.max_steps=20", "trainer.save_every=1"], tmp_path)
    step = t.optimizer.step

    def overflowing_step(*args, **kwargs):
        out = step(*args, **kwargs)
        if t.step == 2:  # the third update
            with torch.no_grad():
                next(t.model.parameters())[0, 0] = float("inf")
        return out

    t.optimizer.step = overflowing_step
    with pytest.raises(UserError, match="refusing to save step 3: the model has non-finite weights") as e:
        t.fit()
    assert "optimizer.lr" in str(e.value)
    ckpts = tmp_path / "checkpoints"
    assert [s for s, _ in checkpoint.step_dirs(ckpts)] == [1, 2] and os.readlink(ckpts / "last") == "step-2"
    assert not list(ckpts.glob(".tmp-*"))


def test_fp16_overflow_lowers_the_loss_scale_instead_of_failing(tmp_path: Path, caplog) -> None:
    """With a grad scaler, overflowed gradients are how it finds its scale: skipped, not counted as bad steps
    (max_bad_steps=1 would otherwise stop the run at the first overflow)."""
    caplog.set_level(logging.INFO)
    t = build([*TINY_GPT, *FAST, "trainer.max_steps=10", "trainer.max_bad_steps=1"], tmp_path)
    t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, growth_interval=10_000)
    summary = t.fit()
    assert summary["steps"] == 10 and summary["skipped_steps"] >= 1
    assert t.scaler.get_scale() < 2.0 ** 127
    assert any("gradients overflowed" in m and "loss scale now" in m for m in caplog.messages)
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    model.save_pretrained = lambda path, safe_serialization=True: None
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="non-finite weights"):
        checkpoint.save(tmp_path, 5, model, None, {}, keep_last=2, is_best=False)
    assert list(tmp_path.iterdir()) == []


# -- kills while checkpoints are being written --------------------------------------------------------------------
SAVER = """
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
from llmtrain.training import checkpoint

class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(512, 1024))
    def save_pretrained(self, path, safe_serialization=True):
        Path(path).mkdir(parents=True, exist_ok=True)
        save_file({"w": self.w.detach()}, str(Path(path) / "model.safetensors"))

directory, model = Path(sys.argv[1]), Model()
done = checkpoint.step_dirs(directory)
step = done[-1][0] if done else 0
print("ready", flush=True)
while True:
    step += 1
    with torch.no_grad():
        model.w.fill_(step)
    checkpoint.save(directory, step, model, None, {"step": step, "blob": torch.full((512, 512), step)},
                    keep_last=2, is_best=step % 4 == 1)
"""


def check_checkpoints(directory: Path) -> int:
    """`last` and `best` resolve to complete checkpoints whose weights and state agree; returns last's step."""
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.zeros(512, 1024))
    newest = checkpoint.find(directory.parent, "auto")
    assert newest is not None and (directory / "last").resolve() == newest.resolve()
    for name in ("last", "best"):
        state = checkpoint.load(directory / name, model)
        assert torch.equal(model.w, torch.full_like(model.w, state["step"])), name
        assert torch.equal(state["blob"], torch.full((512, 512), state["step"]))
    assert checkpoint.load(directory / "best", model)["step"] % 4 == 1
    return torch.load(directory / "last" / checkpoint.STATE_FILE, weights_only=True)["step"]


def test_a_kill_at_any_instant_of_a_checkpoint_write_leaves_loadable_checkpoints(tmp_path: Path) -> None:
    """A process saving checkpoints in a loop is SIGKILLed at 3 arbitrary instants; after each, everything that
    `last`/`best`/resume=auto name is complete, and the next process carries on from there."""
    directory = tmp_path / "checkpoints"
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    steps = []
    for delay in (0.13, 0.41, 0.77):
        proc = subprocess.Popen([sys.executable, str(script), str(directory)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        first = checkpoint.step_dirs(directory)[-1][0] if checkpoint.step_dirs(directory) else 0
        while (checkpoint.step_dirs(directory) or [(0, None)])[-1][0] < first + 2:  # a few saves in
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        steps.append(check_checkpoints(directory))
        # at most keep_last complete checkpoints plus `best`, plus one where the kill fell between publishing a
        # checkpoint and pruning the oldest (the next save prunes it)
        assert len(checkpoint.step_dirs(directory)) <= 4
    assert steps == sorted(steps) and steps[-1] > steps[0]


def test_keep_last_never_deletes_best_or_last(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    model.save_pretrained = lambda path, safe_serialization=True: Path(path).mkdir(parents=True)
    for step in range(1, 7):
        checkpoint.save(tmp_path, step, model, None, {"step": step}, keep_last=2, is_best=step == 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "last", "step-2", "step-5", "step-6"]
    assert os.readlink(tmp_path / "best") == "step-2" and os.readlink(tmp_path / "last") == "step-6"
    # resuming an older checkpoint: the next save is `last`, older than the newest, and survives keep_last=1
    checkpoint.save(tmp_path, 3, model, None, {"step": 3}, keep_last=1, is_best=False)
    assert os.readlink(tmp_path / "last") == "step-3" and (tmp_path / "step-3").is_dir()
    assert (tmp_path / "step-2").is_dir()


# -- signals --------------------------------------------------------------------------------------------------------
def check_interrupted(run: Path, out: str, code: int, signum: int, max_steps: int) -> int:
    """The interrupted run's exit, message and checkpoint; returns the step it stopped at."""
    assert code == 128 + signum, out
    assert f"stopped by {signal.Signals(signum).name}" in out and f"hydra.run.dir={run} trainer.resume=auto" in out
    assert "Traceback" not in out
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"
    stopped = torch.load(run / "checkpoints" / "last" / checkpoint.STATE_FILE, weights_only=True)["step"]
    assert 3 <= stopped < max_steps and f"checkpoints/step-{stopped}" in out
    assert max(r["step"] for r in records(run)) == stopped  # what was logged is on disk, up to the checkpoint
    return stopped


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_143_and_resume_auto_continues(tmp_path: Path) -> None:
    """A preempted cluster job: SIGTERM to a real run mid-training."""
    overrides = [*TINY_GPT, *FAST, "trainer.max_steps=12", "trainer.log_every=1"]
    run = tmp_path / "run"
    proc = start_slow_run(overrides, run, tmp_path, after=0, delay=0.2)
    try:
        wait_for(proc, lambda: logged_past(run, 3))
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    check_interrupted(run, out, proc.returncode, signal.SIGTERM, 12)
    summary = train_in_process([*overrides, "trainer.resume=auto"], run)
    assert summary["steps"] == 12
    assert [r["step"] for r in records(run) if r["kind"] == "train"] == list(range(1, 13))


def test_ctrl_c_saves_a_checkpoint_exits_130_and_resume_auto_continues(tmp_path: Path, capfd, monkeypatch) -> None:
    """SIGINT delivered to this process during step 4 (the entry point run in-process)."""
    overrides = [*TINY_GPT, *FAST, "trainer.max_steps=12", "trainer.log_every=1"]
    train_step = Trainer.train_step

    def step(self, group):
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(self, group)

    monkeypatch.setattr(Trainer, "train_step", step)
    run = tmp_path / "run"
    code, out = run_main(overrides, run, capfd, monkeypatch)
    assert check_interrupted(run, out, code, signal.SIGINT, 12) == 4  # the step in flight finishes first
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    monkeypatch.undo()
    summary = train_in_process([*overrides, "trainer.resume=auto"], run)
    assert summary["steps"] == 12
    assert [r["step"] for r in records(run) if r["kind"] == "train"] == list(range(1, 13))


# -- early stopping -----------------------------------------------------------------------------------------------
def test_early_stopping_ends_the_run_with_best_at_the_best_evaluation(tmp_path: Path) -> None:
    """patience=2, and min_delta larger than any improvement after the first evaluation: the run stops at the
    third evaluation; `best` is the checkpoint of the lowest eval loss, not the last one."""
    summary = train_in_process([*TINY_GPT, *FAST, "trainer.max_steps=200", "trainer.eval_every=5",
                                "trainer.early_stopping.patience=2", "trainer.early_stopping.min_delta=5.0",
                                "optimizer.lr=3e-3", "trainer.keep_last=1"], tmp_path)
    evals = [r for r in records(tmp_path) if r["kind"] == "eval"]
    assert summary["early_stopped"] and summary["steps"] == 15
    assert [r["step"] for r in evals] == [5, 10, 15]  # the stopping evaluation is not repeated
    best = min(evals, key=lambda r: r["loss"])
    assert best["step"] != 5  # the loss kept falling, just by less than min_delta
    ckpts = tmp_path / "checkpoints"
    assert os.readlink(ckpts / "best") == f"step-{best['step']}"
    assert summary["best_eval_loss"] == pytest.approx(best["loss"])
    state = torch.load(ckpts / "best" / checkpoint.STATE_FILE, weights_only=True)
    assert state["best_eval_loss"] == pytest.approx(best["loss"])


# -- only safe things are loaded ------------------------------------------------------------------------------------
class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoint_state_is_loaded_weights_only(tmp_path: Path) -> None:
    t = build([*TINY_GPT, *FAST, "trainer.max_steps=2"], tmp_path / "run")
    t.fit()
    last = (tmp_path / "run" / "checkpoints" / "last").resolve()
    marker = tmp_path / "pwned"
    torch.save({"step": 2, "evil": Payload(marker)}, last / checkpoint.STATE_FILE)
    # no checksums to give the swap away (a checkpoint from before them, or checksums rewritten as well):
    # loading weights_only is what stops the payload
    (last / checkpoint.CHECKSUMS).unlink()
    assert pickle.loads(pickle.dumps(Payload(marker))) and marker.exists()  # the payload does run when unpickled
    marker.unlink()
    with pytest.raises(ConfigError, match="not a plain-tensor trainer state"):
        build([*TINY_GPT, *FAST, "trainer.max_steps=4", f"trainer.resume={last}"], tmp_path / "other").fit()
    assert not marker.exists()


def test_resuming_with_another_model_is_refused(tmp_path: Path) -> None:
    train_in_process([*TINY_GPT, *FAST, "trainer.max_steps=2"], tmp_path / "run")
    with pytest.raises(ConfigError, match="does not fit this model"):
        train_in_process([*TINY_GPT, *FAST, "model.config.n_embd=64", "trainer.max_steps=4",
                          f"trainer.resume={tmp_path / 'run'}"], tmp_path / "other")


REMOTE_CONFIG = """
from pathlib import Path
from transformers import GPT2Config
Path({marker!r}).write_text("ran")

class CustomConfig(GPT2Config):
    model_type = "custom_gpt"
"""


def test_remote_code_runs_only_with_trust_remote_code(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    marker = tmp_path / "ran"
    repo = tmp_path / "custom"
    repo.mkdir()
    (repo / "configuration_custom.py").write_text(REMOTE_CONFIG.format(marker=str(marker)))
    (repo / "config.json").write_text(json.dumps({
        "model_type": "custom_gpt", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"},
        "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 256}))
    with pytest.raises(ConfigError, match="model.pretrained=.*only with model.trust_remote_code=true"):
        validate(compose_cfg([*TINY_GPT, f"model.pretrained={repo}"]))
    assert not marker.exists()
    validate(compose_cfg([*TINY_GPT, f"model.pretrained={repo}", "model.trust_remote_code=true"]))
    assert marker.read_text() == "ran"
