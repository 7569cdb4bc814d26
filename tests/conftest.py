"""Shared fixtures: hermetic environment (no Hub, a private cache), config composition, tiny overrides."""
from __future__ import annotations

import json
import warnings
import runpy
import random
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "llmtrain" / "conf"

# A tiny, fast configuration: 2 layers, hidden 32, a small slice of the built-in corpus.
TINY = ["data.train_words=20000", "data.validation_words=3000", "data.max_length=64", "data.tokenizer.vocab_size=512",
        "trainer.batch_size=8", "trainer.max_steps=20", "trainer.eval_every=0", "trainer.log_every=5",
        "trainer.progress=false", "hardware.precision=fp32"]
TINY_GPT = ["model=gpt2_tiny", *TINY]
TINY_BERT = ["model=distilbert_tiny", *TINY]


@pytest.fixture(scope="session", autouse=True)
def hermetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No network, and a cache of our own shared by the session (so tests reuse each other's tokenizers)."""
    cache = tmp_path_factory.mktemp("llmtrain-cache")
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                      LLMTRAIN_CACHE=str(cache), TOKENIZERS_PARALLELISM="false")
    return cache


def compose_cfg(overrides: list[str], hydra: bool = False) -> DictConfig:
    """Compose conf/config.yaml with overrides, as `python -m llmtrain.run` would (the `hydra` keys if asked)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra)


def build(overrides: list[str], run_dir: Path):
    """The Trainer `python -m llmtrain.run` would build for these overrides (so a test can reach into it)."""
    from llmtrain.run import build_trainer

    return build_trainer(compose_cfg(overrides), run_dir)


def records(run_dir: Path, kind: str | None = None) -> list[dict]:
    """The run's metrics.jsonl records (of one kind: train, eval)."""
    logged = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in logged if kind is None or r["kind"] == kind]


def train_in_process(overrides: list[str], run_dir: Path) -> dict:
    """Run llmtrain.run.train on a composed config, in this process; returns the summary."""
    from llmtrain.run import train

    cfg = compose_cfg(overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    return train(cfg, run_dir)


def run_cli(args: list[str], cwd: Path, timeout: float = 600, module: str = "llmtrain.run",
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m llmtrain.run ARGS` in a subprocess, the way a user does."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


# A real run through the real entry point, with every step after SLOW_AFTER slowed down so that a test can
# kill it mid-run, and TensorBoard flushing at once so the killed run leaves events past its checkpoint.
SLOW_RUN = """
import os, runpy, sys, time
from functools import partial
from llmtrain.training import tracking, trainer
after, delay = int(os.environ["SLOW_AFTER"]), float(os.environ["SLOW_DELAY"])
train_step = trainer.Trainer.train_step
def slow_step(self, group):
    out = train_step(self, group)
    if self.step > after:
        time.sleep(delay)
    return out
trainer.Trainer.train_step = slow_step
tracking.SummaryWriter = partial(tracking.SummaryWriter, flush_secs=0.01)
if os.environ.get("SLOW_MODEL_S"):  # hold the final model/ half-done (written aside, not yet swapped in)
    from llmtrain.training import checkpoint
    write_model = checkpoint.write_model
    def slow_write_model(path, *args):
        write_model(path, *args)
        if path.name == ".tmp-model":
            time.sleep(float(os.environ["SLOW_MODEL_S"]))
    checkpoint.write_model = slow_write_model
sys.argv[0] = os.path.join(os.environ["LLMTRAIN_ROOT"], "llmtrain", "run.py")
runpy.run_module("llmtrain.run", run_name="__main__", alter_sys=True)
"""


def start_slow_run(overrides: list[str], run_dir: Path, tmp_path: Path, after: int, delay: float = 0.3,
                   env: dict | None = None) -> subprocess.Popen:
    """`python -m llmtrain.run` into run_dir, each step after `after` slowed by `delay` s (SLOW_RUN)."""
    script = tmp_path / "slow_run.py"
    script.write_text(SLOW_RUN)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LLMTRAIN_ROOT": str(ROOT), "SLOW_AFTER": str(after),
           "SLOW_DELAY": str(delay), **(env or {})}
    return subprocess.Popen([sys.executable, str(script), *overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before it could be stopped:\n"
                                 f"{proc.stdout.read()}")
        assert time.monotonic() < deadline, "the run never got there"
        time.sleep(0.02)


def logged_past(run_dir: Path, step: int) -> bool:
    try:
        return any(r["kind"] == "train" and r["step"] >= step for r in records(run_dir))
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ---- labeled data for classifiers (test_classification, test_pretrained) ----
TOPICS = {"sports": "goal match team coach score league striker referee".split(),
          "food": "bread soup recipe cheese bake spice dinner kitchen".split(),
          "tech": "laptop software server code chip network robot screen".split()}
FILLER = "the a of and to in it was very that this with we they then later today again quite".split()
# Classification runs: the tiny test config with labeled data. One thread: on a busy 2-core machine a model this
# small runs 80 steps in ~1 s with one thread and ~45 s with two (each op waits for the descheduled thread).
CLS = [*TINY, "model=distilbert_cls_tiny", "data=json", "trainer.batch_size=16", "optimizer.lr=3e-3",
       "trainer.log_every=10", "hardware.num_threads=1"]
# What makes the tiny classifier learn in few steps every time: width 64, no dropout, a high learning rate.
# (At width 32 with dropout, some seeds sit for 100+ steps with two of the three classes merged.)
FAST_CLS = ["model.config.dim=64", "model.config.hidden_dim=128", "model.config.dropout=0.0",
        "model.config.attention_dropout=0.0", "++model.config.seq_classif_dropout=0.0", "optimizer.lr=5e-3"]


def topic_records(n: int, seed: int, weights: tuple[float, ...] = (1, 1, 1)) -> list[dict]:
    """Short texts of filler words with one or two words of their topic: learnable, varied in length."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choices(list(TOPICS), weights=weights)[0]
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 16))]
        for _ in range(rng.randint(2, 3)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(TOPICS[label]))
        out.append({"text": " ".join(words), "label": label})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def topic_dir(root: Path, n_train: int = 1200, n_valid: int = 300) -> Path:
    """A directory with train.jsonl and valid.jsonl (the second is the validation split, by its name)."""
    write_jsonl(root / "train.jsonl", topic_records(n_train, seed=1))
    write_jsonl(root / "valid.jsonl", topic_records(n_valid, seed=2))
    return root


def run_main(args: list[str], run_dir: Path, capfd, monkeypatch) -> tuple[int, str]:
    """`python -m llmtrain.run ARGS`, in this process (the real entry point, __main__ block included)."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / "llmtrain" / "run.py"), *args, f"hydra.run.dir={run_dir}"])
    capfd.readouterr()
    root, ours = logging.getLogger(), logging.getLogger("llmtrain")
    saved = root.handlers[:], root.level, ours.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: llmtrain.run is already imported
        try:
            runpy.run_module("llmtrain.run", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code
        finally:  # Hydra configured logging for the run (handlers on this test's captured streams): undo it
            for handler in root.handlers:
                if handler not in saved[0]:
                    handler.close()
            root.handlers[:] = saved[0]
            root.setLevel(saved[1])
            ours.setLevel(saved[2])
    out, err = capfd.readouterr()
    return code, out + err


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    assert worst <= 1e-6, worst
