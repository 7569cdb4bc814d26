"""trainer.profile=true: a few steps recorded with torch.profiler into the run directory, top operators printed."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from conftest import TINY_GPT, train_in_process
from llmtrain.training import profiling

PROFILED = [*TINY_GPT, "trainer.profile=true", "hardware.num_threads=1"]


def test_profile_writes_a_trace_that_parses(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        s = train_in_process([*PROFILED, "trainer.max_steps=8"], tmp_path)
    assert s["steps"] == 8  # profiling stops after its steps; training carries on
    traces = list((tmp_path / "profile").glob("*.pt.trace.json"))  # the name TensorBoard's profiler plugin finds
    assert len(traces) == 1
    trace = json.loads(traces[0].read_text())  # Chrome trace JSON, as Perfetto and TensorBoard read it
    events = trace["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert any(n.startswith("aten::mm") or n.startswith("aten::addmm") for n in names)
    steps = sorted(n for n in names if n.startswith("ProfilerStep#"))
    assert len(steps) == profiling.ACTIVE
    top = (tmp_path / "profile" / "top_ops.txt").read_text()
    assert "Self CPU" in top and "aten::" in top
    assert f"top operators over {profiling.ACTIVE} profiled steps" in caplog.text and "aten::" in caplog.text


def test_a_run_shorter_than_the_schedule_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        train_in_process([*PROFILED, "trainer.max_steps=2"], tmp_path)
    assert "profiling needs at least 3 steps" in caplog.text
    assert not list((tmp_path / "profile").glob("*.pt.trace.json"))
