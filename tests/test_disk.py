"""A full disk, for real: a small tmpfs filled up under a run's checkpoints, model/, records and data cache.
Every write path fails with exit 2 and "no space left to write <what> in <path>", no traceback and nothing
half-written; the previous checkpoint stays loadable and a resume, once there is space, continues."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models

from conftest import TINY_GPT, records, run_cli, start_slow_run, wait_for
from llmtrain.training import checkpoint
from llmtrain.errors import NoSpaceError, writing
from llmtrain.training.tracking import Tracker

FAST = [*TINY_GPT, "hardware.num_threads=1"]


@pytest.fixture
def disk(tmp_path: Path):
    """mount(kib) -> a fresh tmpfs of that size (skips the test where mounting is not allowed); unmounted after."""
    mounted: list[Path] = []

    def mount(kib: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command to make a small tmpfs with")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs to fill up ({done.stderr.strip() or done.returncode}): needs root")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(where: Path, leave_kib: int = 0) -> Path:
    """A filler file that leaves `leave_kib` free on the file system of `where` (0: none at all)."""
    st = os.statvfs(where)
    filler = where / "filler"
    size = max(0, st.f_bavail * st.f_frsize - leave_kib * 1024)
    with open(filler, "wb") as f:
        try:
            f.write(b"\0" * size)
            f.flush()
        except OSError:  # the last page or so: the disk is full, which is what we want
            pass
    return filler


def cli(run: Path, tmp_path: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real entry point into `run`. run.log goes outside the full disk: Hydra's log file is not under test here."""
    return run_cli([*FAST, *overrides, f"hydra.run.dir={run}",
                    f"hydra.job_logging.handlers.file.filename={tmp_path}/run.log"], cwd=tmp_path, env=env)


def half_written(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp") or ".tmp" in p.name]


def assert_clean_failure(done: subprocess.CompletedProcess, message: str, root: Path) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert f"error: no space left to write {message}" in output, output
    assert "Traceback" not in output and "Exception in thread" not in output, output
    assert half_written(root) == []


# -- checkpoints and model/ -----------------------------------------------------------------------------------
@pytest.mark.parametrize("where, steps, save_every, leave_kib, message", [
    ("weights", 20, 10, 800, "the checkpoint of step 20 in {run}/checkpoints"),
    pytest.param("trainer_state", 20, 10, 1000, "the checkpoint of step 20 in {run}/checkpoints",
                 marks=pytest.mark.slow),  # the same path as the weights' failure, one file later
    ("model", 10, 0, 850, "the final model in {run}/model"),
])
def test_a_full_disk_fails_clearly_and_a_resume_continues_once_there_is_space(
        tmp_path: Path, disk, where: str, steps: int, save_every: int, leave_kib: int, message: str) -> None:
    """Room for the first checkpoint (~0.7 MB) and no more: the second one (its model.safetensors, or with a little
    more room its trainer_state.pt) or model/ after the last checkpoint does not fit."""
    root = disk(4096)
    filler, run = fill(root, leave_kib), root / "run"
    args = [f"trainer.max_steps={steps}", f"trainer.save_every={save_every}"]
    done = cli(run, tmp_path, *args)
    assert_clean_failure(done, message.format(run=run), run)
    output = done.stdout + done.stderr
    intact = run / "checkpoints" / f"step-{10}"
    assert f"the previous checkpoint, {intact}, is intact" in output and "trainer.resume=auto" in output
    assert os.readlink(run / "checkpoints" / "last") == "step-10"
    assert checkpoint.verify(intact) is None and checkpoint.find(run, "auto") == intact
    assert json.loads((run / "metrics.json").read_text())["status"] == "failed"

    filler.unlink()  # space freed: the same command, resumed, finishes the run
    done = cli(run, tmp_path, *args, "trainer.resume=auto")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {intact} at step 10" in done.stdout
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == steps
    assert (run / "model" / "model.safetensors").exists() and half_written(run) == []


def test_sigint_on_a_full_disk_reports_the_checkpoint_it_could_not_save(tmp_path: Path, disk) -> None:
    """SIGINT saves a checkpoint before stopping; on a full disk that save fails as any other: exit 2, the message,
    no traceback, the previous checkpoint intact."""
    root = disk(4096)
    run = root / "run"
    proc = start_slow_run([*FAST, "trainer.max_steps=40", "trainer.save_every=10", "trainer.log_every=20",
                           f"hydra.job_logging.handlers.file.filename={tmp_path}/run.log"], run, tmp_path, after=10)
    try:
        wait_for(proc, lambda: (run / "checkpoints" / "step-10" / checkpoint.CHECKSUMS).exists())
        fill(root)
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 2, output
    assert "error: no space left to write the checkpoint of step" in output, output
    assert "Traceback" not in output and half_written(run) == []
    assert checkpoint.find(run, "auto") == run / "checkpoints" / "step-10"


# -- metrics.jsonl and TensorBoard ------------------------------------------------------------------------------
def test_the_disk_filling_up_while_logging_fails_the_run_and_a_resume_logs_every_step_once(tmp_path: Path,
                                                                                          disk) -> None:
    """Another process fills the disk after the first checkpoint: the next records (TensorBoard's events, written
    by its own thread, or metrics.jsonl) fail the run; after freeing space, resume=auto drops what was torn and
    the finished run has every step's record exactly once, in metrics.jsonl and in TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = disk(4096)
    run = root / "run"
    overrides = [*FAST, "trainer.max_steps=40", "trainer.save_every=10", "trainer.log_every=1",
                 f"hydra.job_logging.handlers.file.filename={tmp_path}/run.log"]
    proc = start_slow_run(overrides, run, tmp_path, after=10)
    try:
        wait_for(proc, lambda: (run / "checkpoints" / "step-10" / checkpoint.CHECKSUMS).exists())
        filler = fill(root)
        output = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 2, output
    assert (f"error: no space left to write TensorBoard events in {run}:" in output
            or f"error: no space left to write the metrics in {run}/metrics.jsonl:" in output), output
    assert "Traceback" not in output and "Exception in thread" not in output and half_written(run) == []
    assert checkpoint.find(run, "auto") == run / "checkpoints" / "step-10"

    filler.unlink()
    done = cli(run, tmp_path, *overrides[len(FAST):], "trainer.resume=auto")
    assert done.returncode == 0, done.stdout + done.stderr
    assert [r["step"] for r in records(run, "train")] == list(range(1, 41))
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 41))


def test_tensorboard_writer_thread_failure_is_raised_not_printed(tmp_path: Path, disk, capfd) -> None:
    """TensorBoard writes events in a thread of its own; on a full disk that thread dies holding the error. The
    tracker raises it as NoSpaceError, and the thread's traceback is not printed."""
    root = disk(64)
    fill(root)
    with pytest.raises(NoSpaceError, match=f"no space left to write TensorBoard events in {root}"):
        Tracker(root)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "Exception in thread" not in out + err


def test_a_tracker_that_runs_out_of_space_closes_quietly_after_an_error(tmp_path: Path, disk) -> None:
    root = disk(256)
    tracker = Tracker(root)
    tracker.log("train", 1, 10, {"loss": 1.0})
    fill(root)
    with pytest.raises(NoSpaceError):
        for step in range(2, 10_000):  # the first record that needs a page the disk no longer has
            tracker.log("train", step, 10 * step, {f"value_{i}": float(i) for i in range(20)})
            tracker.flush()
    tracker.close(quiet=True)  # what an error in flight calls: it must not hide that error with another
    assert tracker.closed


# -- the data cache -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kib, message", [(64, "the generated corpus in {cache}/corpus/builtin-"),
                                          (260, "the tokenized data in {cache}/tokenized/clm-64-")])
def test_a_full_cache_disk_fails_clearly(tmp_path: Path, disk, kib: int, message: str) -> None:
    """LLMTRAIN_CACHE on a small disk: the corpus (~130 kB), or the tokenized blocks (~230 kB) after the corpus and
    the tokenizer, do not fit."""
    cache = disk(kib)
    done = cli(tmp_path / "run", tmp_path, env={"LLMTRAIN_CACHE": str(cache)})
    assert_clean_failure(done, message.format(cache=cache), cache)
    assert "LLMTRAIN_CACHE" in done.stdout
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


# -- what each library raises on a full disk ------------------------------------------------------------------------
@pytest.mark.parametrize("library", ["python", "torch", "safetensors", "tokenizers"])
def test_writing_recognizes_a_full_disk_however_the_library_reports_it(tmp_path: Path, disk, library: str) -> None:
    """torch wraps the OSError in a RuntimeError, safetensors and tokenizers (Rust) pass on only a message:
    all of them are a full disk, named with what was written and where."""
    root = disk(64)
    fill(root)
    path = root / "out"
    write = {"python": lambda: path.write_bytes(b"x" * 100_000),
             "torch": lambda: torch.save(torch.zeros(100_000), open(path, "wb")),
             "safetensors": lambda: save_file({"w": torch.zeros(100_000)}, str(path)),
             "tokenizers": lambda: Tokenizer(models.WordLevel({f"w{i:06d}": i for i in range(20_000)},
                                                              unk_token="w000000")).save(str(path))}[library]
    with pytest.raises(NoSpaceError, match=f"^no space left to write the {library} file in {root}: free disk space$"):
        with writing(f"the {library} file", root, partial=path):
            write()
    assert not path.exists()  # the half-written file is gone


def test_the_safety_net_maps_a_full_disk_no_write_site_named(tmp_path: Path, disk) -> None:
    """run.py's last resort: an OSError(ENOSPC) from anywhere (a write error names no file) is still a NoSpaceError."""
    root = disk(64)
    fill(root)
    message = f"^no space left to write the run's outputs in {tmp_path}: free disk space$"
    with pytest.raises(NoSpaceError, match=message):
        with writing(None, tmp_path):
            with open(root / "notes.txt", "w") as f:
                f.write("x" * 100_000)
                f.flush()


# -- Hydra's files and run.log ----------------------------------------------------------------------------------
def test_a_full_disk_before_the_run_starts_refuses_it_cleanly(tmp_path: Path, disk) -> None:
    """Not even .hydra/ fits: exit 2 naming it, nothing half-written, no traceback (run.log on the full disk too)."""
    root = disk(1024)
    fill(root)
    run = root / "run"
    done = run_cli([*FAST, "trainer.max_steps=2", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert_clean_failure(done, f"the run's config (.lock, .hydra/ and config_changes.jsonl) in {run}", run)
    assert not (run / ".hydra").exists()


def test_run_log_on_a_full_disk_says_so_once(tmp_path: Path, disk, capfd) -> None:
    from llmtrain.runtime.rundir import RunLogHandler

    root = disk(256)
    fill(root)
    handler = RunLogHandler(str(root / "run.log"))
    logger = logging.getLogger("llmtrain.test_run_log")
    logger.addHandler(handler)
    try:
        for i in range(200):
            logger.warning("line %d of a run that goes on", i)
    finally:
        logger.removeHandler(handler)
        handler.close()
    err = capfd.readouterr().err
    assert err.count(f"no space left to write run.log in {root}") == 1, err
    assert "Logging error" not in err and "Traceback" not in err
