"""Shared fixtures: hermetic environment (no Hub, a private cache), config composition, tiny overrides."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

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
