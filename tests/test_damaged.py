"""Damaged checkpoints are detected: each records the size and sha256 of its files, checked before loading.
resume=auto passes over a damaged one with a warning; one named on the command line is refused, naming the file."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from conftest import TINY_GPT, assert_same_weights, run_cli, run_main, train_in_process
from llmtrain.training import checkpoint
from llmtrain.errors import ConfigError

RUN = [*TINY_GPT, "hardware.num_threads=1", "trainer.max_steps=20", "trainer.save_every=10", "trainer.keep_last=0"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of 20 steps in one go, with checkpoints at steps 10 and 20: the reference a resumed run must equal."""
    run = tmp_path_factory.mktemp("damaged") / "finished"
    train_in_process(RUN, run)
    return run


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run", symlinks=True))


def damage(path: Path, how: str) -> None:
    """Flip a byte in the middle, empty, truncate to half, or delete the file."""
    data = bytearray(path.read_bytes())
    if how == "flipped":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(bytes(data[:len(data) // 2]))
    else:
        path.unlink()


def refused(resume: Path, run_dir: Path, capfd, monkeypatch) -> str:
    """The output of `python -m llmtrain.run ... trainer.resume=<resume>` (run in this process), which must fail
    with exit 2 and no traceback."""
    code, output = run_main([*RUN, f"trainer.resume={resume}"], run_dir, capfd, monkeypatch)
    assert code == 2 and "Traceback" not in output, output
    return output


def test_resume_auto_passes_over_a_damaged_checkpoint_and_ends_as_the_uninterrupted_run(finished: Path,
                                                                                        tmp_path: Path) -> None:
    """Bytes flipped in the middle of the newest checkpoint's weights: resume=auto warns, naming the file, continues
    from step 10, and ends with the uninterrupted run's weights (and an intact step-20 again)."""
    run = copy_of(finished, tmp_path)
    ckpts = run / "checkpoints"
    damage(ckpts / "step-20" / "model.safetensors", "flipped")
    done = run_cli([*RUN, "trainer.resume=auto", f"hydra.run.dir={run}"], cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert (f"checkpoint {ckpts / 'step-20'} is damaged: {ckpts / 'step-20' / 'model.safetensors'} does not match "
            "the checksum") in output and "resuming from an older one" in output
    assert f"resumed from {ckpts / 'step-10'} at step 10" in output
    assert_same_weights(run / "model", finished / "model")
    assert_same_weights(ckpts / "step-20", finished / "checkpoints" / "step-20")
    assert checkpoint.verify(ckpts / "step-20") is None


@pytest.mark.parametrize("name, how, problem", [
    ("model.safetensors", "flipped", "{file} does not match the checksum recorded when it was saved"),
    ("trainer_state.pt", "empty", "{file} is empty (0 bytes; {size} were written)"),
    ("model.safetensors", "truncated", "{file} is truncated ({half} of {size} bytes)"),
    ("tokenizer.json", "missing", "{file} is missing"),
])
def test_a_named_damaged_checkpoint_is_refused_naming_the_file(finished: Path, tmp_path: Path, capfd, monkeypatch,
                                                               name: str, how: str, problem: str) -> None:
    run = copy_of(finished, tmp_path)
    step = run / "checkpoints" / "step-20"
    size = (step / name).stat().st_size
    damage(step / name, how)
    output = refused(step, tmp_path / "next", capfd, monkeypatch)
    assert f"error: trainer.resume={step}: the checkpoint {step} is damaged: " in output, output
    assert problem.format(file=step / name, size=size, half=size // 2) in output, output


def test_a_named_run_whose_newest_checkpoint_is_damaged_is_refused(finished: Path, tmp_path: Path, capfd,
                                                                    monkeypatch) -> None:
    """Naming a run directory means its newest checkpoint: damaged, it is refused rather than silently swapped."""
    run = copy_of(finished, tmp_path)
    damage(run / "checkpoints" / "step-20" / "trainer_state.pt", "flipped")
    output = refused(run, tmp_path / "next", capfd, monkeypatch)
    assert f"{run / 'checkpoints' / 'step-20' / 'trainer_state.pt'} does not match the checksum" in output


def test_when_every_checkpoint_is_damaged_resume_auto_refuses(finished: Path, tmp_path: Path) -> None:
    run = copy_of(finished, tmp_path)
    for step in (10, 20):
        damage(run / "checkpoints" / f"step-{step}" / "trainer_state.pt", "truncated")
    with pytest.raises(ConfigError, match="every checkpoint in .* is damaged .*delete that directory"):
        checkpoint.find(run, "auto")


# -- checkpoints saved before checksums -----------------------------------------------------------------------------
def test_a_checkpoint_without_checksums_loads_with_one_warning(finished: Path, tmp_path: Path, caplog) -> None:
    from transformers import GPT2LMHeadModel

    run = copy_of(finished, tmp_path)
    step = run / "checkpoints" / "step-20"
    (step / checkpoint.CHECKSUMS).unlink()
    model = GPT2LMHeadModel.from_pretrained(step)
    with caplog.at_level(logging.WARNING):
        assert checkpoint.find(run, "auto") == step
        assert checkpoint.load(step, model)["step"] == 20
    assert [m for m in caplog.messages if "unverified" in m] == [
        f"checkpoint {step} has no checksums.json (saved by an older llmtrain): loading it unverified"]


@pytest.mark.parametrize("name, how, says", [("trainer_state.pt", "empty", "(the file is empty)"),
                                             ("trainer_state.pt", "truncated", "is damaged or not a plain-tensor")])
def test_a_damaged_checkpoint_without_checksums_fails_with_a_message(finished: Path, tmp_path: Path, capfd,
                                                                     monkeypatch, name: str, how: str,
                                                                     says: str) -> None:
    """No checksums to check: the loaders' own errors, turned into a message (an empty trainer_state.pt used to
    crash with an IndexError inside the error handler)."""
    run = copy_of(finished, tmp_path)
    step = run / "checkpoints" / "step-20"
    (step / checkpoint.CHECKSUMS).unlink()
    damage(step / name, how)
    output = refused(step, tmp_path / "next", capfd, monkeypatch)
    assert f"error: trainer.resume={step}: " in output and says in output, output


def test_generate_refuses_a_damaged_checkpoint(finished: Path, tmp_path: Path) -> None:
    from llmtrain import generate

    run = copy_of(finished, tmp_path)
    step = run / "checkpoints" / "step-20"
    assert generate.load(str(step), "generate", "cpu")[0] is not None
    damage(step / "model.safetensors", "flipped")
    with pytest.raises(ConfigError, match="the checkpoint is damaged: .*model.safetensors does not match"):
        generate.load(str(step), "generate", "cpu")
