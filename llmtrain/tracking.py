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


def truncate_after(run_dir: Path, step: int, tokens: int) -> None:
    """Drop what a killed run recorded after the checkpoint a resumed run starts from, so curves don't fork.

    TensorBoard's own purge_step is not used: its reader drops every event whose step is past the purge
    step in all tags, which would erase the per-token curves (their x axis is tokens, not steps).
    Final-only records (`final/*`, the HParams entry) are dropped too: the resumed run writes them again.
    """
    from tensorboard.compat.proto.event_pb2 import Event

    for path in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        data, kept, pos = path.read_bytes(), bytearray(), 0
        while pos + 12 <= len(data):
            end = pos + 12 + int.from_bytes(data[pos:pos + 8], "little") + 4
            if end > len(data):  # a record torn by the kill
                break
            event = Event.FromString(bytes(data[pos + 12:end - 4]))
            tags = [v.tag for v in event.summary.value] if event.HasField("summary") else []
            if not any(t.startswith(("final/", "hparams/", "_hparams_/")) or
                       event.step > (tokens if "_vs_tokens/" in t else step) for t in tags):
                kept += data[pos:end]
            pos = end
        if len(kept) != len(data):
            tmp = path.with_name(".truncating.tmp")  # no "tfevents" in the name: TensorBoard must not read it
            tmp.write_bytes(bytes(kept))
            os.replace(tmp, path)
    jsonl = Path(run_dir) / "metrics.jsonl"
    if jsonl.exists():
        lines = []
        for line in jsonl.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by the kill
                continue
            if record.get("step", 0) <= step:
                lines.append(line + "\n")
        tmp = jsonl.with_name(jsonl.name + ".tmp")
        tmp.write_text("".join(lines))
        os.replace(tmp, jsonl)


class Tracker:
    """Scalars go to TensorBoard twice (per step and per token seen) and to metrics.jsonl once."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled
        if enabled:
            self.tb = SummaryWriter(log_dir=str(self.run_dir))
            self.jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self.tags: set[str] = set()

    def log(self, kind: str, step: int, tokens: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            if value is None or (isinstance(value, float) and not math.isfinite(value)):
                continue
            self.tb.add_scalar(f"{kind}/{name}", value, step)
            self.tags.add(f"{kind}/{name}")
            if name in ("loss", "perplexity", "accuracy"):
                self.tb.add_scalar(f"{kind}_vs_tokens/{name}", value, tokens)
        record = {"kind": kind, "step": step, "tokens": tokens, "time": time.time(),
                  **{k: _clean(float(v)) if v is not None else None for k, v in values.items()}}
        self.jsonl.write(json.dumps(record) + "\n")

    def logged_before(self, kind: str, values: dict) -> None:
        """These scalars are in the run's earlier event files already (a resumed run): hparams() must not add them."""
        self.tags |= {f"{kind}/{name}" for name in values}

    def hparams(self, hparams: dict, metrics: dict, step: int) -> None:
        """An HParams entry in this run's own event file (not a nested sub-run), with the final metrics at `step`.

        The dashboard shows a metric column as the last value of the scalar with that tag, so `eval_loss` points
        at the `eval/loss` curve (whose last point is the final evaluation); the rest are logged as `final/<name>`.
        """
        if not self.enabled:
            return
        hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        hp = {k: ("none" if v is None else v) for k, v in hp.items()}
        finals = {}
        for name, value in metrics.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            tag = name.replace("_", "/", 1) if name.startswith("eval_") else f"final/{name}"
            if tag not in self.tags:
                self.tb.add_scalar(tag, value, step)
            finals[tag] = float(value)
        exp, ssi, sei = hparams_summary(hp, finals)
        writer = self.tb._get_file_writer()
        for s in (exp, ssi, sei):
            writer.add_summary(s)

    def flush(self) -> None:
        """Put everything logged so far on disk (before a checkpoint: a kill then loses nothing it covers)."""
        if self.enabled:
            self.tb.flush()  # metrics.jsonl is line-buffered: every record is on disk already

    def close(self) -> None:
        if self.enabled:
            self.tb.flush()
            self.tb.close()
            self.jsonl.close()
