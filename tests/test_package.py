"""The package installs: a wheel carries every config, and the installed copy (not this checkout) runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import CONF, ROOT


@pytest.mark.slow
def test_a_wheel_carries_every_yaml_and_runs_installed_elsewhere(tmp_path: Path) -> None:
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True, text=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("llmtrain-*.whl"))
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".yaml")}
    want = {f"llmtrain/conf/{p.relative_to(CONF)}" for p in CONF.rglob("*.yaml")}
    assert want and want <= shipped, sorted(want - shipped)

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, text=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # the installed copy first; the checkout is not on the path
    where = subprocess.run([sys.executable, "-c", "import llmtrain; print(llmtrain.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site), where
    done = subprocess.run([sys.executable, "-m", "llmtrain.run", "model=gpt2_tiny", "trainer.max_steps=5",
                           "trainer.progress=false", "hardware.num_threads=1"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = (elsewhere / "outputs").glob("*/*")
    assert json.loads((run / "metrics.json").read_text())["steps"] == 5
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "model" / "model.safetensors").is_file()
