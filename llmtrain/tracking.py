"""What a run records: TensorBoard scalars and HParams, metrics.jsonl, metrics.json. Only rank 0 writes."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_json(path: Path, obj: dict) -> None:
    """Write JSON atomically: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({k: _clean(v) for k, v in obj.items()}, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class Tracker:
    """Scalars go to TensorBoard twice (per step and per token seen) and to metrics.jsonl once."""

    def __init__(self, run_dir: Path, enabled: bool = True, purge_step: int | None = None):
        self.run_dir, self.enabled = Path(run_dir), enabled
        if enabled:
            # purge_step drops events a crashed run wrote after its last checkpoint, so resumed curves don't fork
            self.tb = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge_step)
            self.jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)

    def log(self, kind: str, step: int, tokens: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            if value is None or (isinstance(value, float) and not math.isfinite(value)):
                continue
            self.tb.add_scalar(f"{kind}/{name}", value, step)
            if name in ("loss", "perplexity", "accuracy"):
                self.tb.add_scalar(f"{kind}_vs_tokens/{name}", value, tokens)
        record = {"kind": kind, "step": step, "tokens": tokens, "time": time.time(),
                  **{k: _clean(float(v)) if v is not None else None for k, v in values.items()}}
        self.jsonl.write(json.dumps(record) + "\n")

    def hparams(self, hparams: dict, metrics: dict) -> None:
        """An HParams entry in this run's own event file (not a nested sub-run), with the final metrics."""
        if not self.enabled:
            return
        hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        hp = {k: ("none" if v is None else v) for k, v in hp.items()}
        finals = {f"hparams/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        exp, ssi, sei = hparams_summary(hp, finals)
        writer = self.tb._get_file_writer()
        for s in (exp, ssi, sei):
            writer.add_summary(s)
        for k, v in finals.items():
            self.tb.add_scalar(k, v, 0)

    def close(self) -> None:
        if self.enabled:
            self.tb.flush()
            self.tb.close()
            self.jsonl.close()
