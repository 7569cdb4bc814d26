"""Metric modules shipped with llmtrain, loaded by local path through `evaluate` (the Hub's scripts are unreachable offline)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `evaluate` imports transformers' pipelines: seconds, paid at the first evaluation, not at start-up
    import evaluate

HERE = Path(__file__).parent


def load(name: str) -> evaluate.EvaluationModule:
    """Load one of the shipped metric modules (`lm_metrics`, `classification`), kept in memory."""
    import evaluate

    return evaluate.load(str(HERE / name), keep_in_memory=True)
