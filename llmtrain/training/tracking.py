"""What a run records: TensorBoard scalars and HParams, metrics.jsonl, metrics.json. Only rank 0 writes.

A full disk while recording raises NoSpaceError (errors.py) naming the file; nothing half-written is left behind
but a torn last record, which a resumed run drops (truncate_after).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

from llmtrain.errors import NoSpaceError, is_no_space, writing

log = logging.getLogger(__name__)
EVENTS = "TensorBoard events"


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_json(path: Path, obj: dict) -> None:
    """Write JSON atomically: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with writing(path.name, path.parent, partial=tmp):
        tmp.write_text(json.dumps({k: _clean(v) for k, v in obj.items()}, indent=2, default=str) + "\n")
        os.replace(tmp, path)


RESUME_ADVICE = "free disk space and resume again; the checkpoint it resumes from is intact"


def _quiet_writer_thread(args: threading.ExceptHookArgs) -> None:
    """TensorBoard's writer thread dies on a full disk and keeps the error; the next write, flush or close raises it
    again in the training thread, which reports it. So the thread's own traceback is not printed as well."""
    if not (is_no_space(args.exc_value) and type(args.thread).__module__.startswith("tensorboard.")):
        _thread_hook(args)


_thread_hook = threading.excepthook  # the hook _quiet_writer_thread passes every other thread's error on to


def _quiet_tensorboard_thread() -> None:
    global _thread_hook
    if threading.excepthook is not _quiet_writer_thread:
        _thread_hook, threading.excepthook = threading.excepthook, _quiet_writer_thread


def write_status(run_dir: Path, status: dict) -> None:
    """metrics.json of a run that failed or was interrupted; when even that does not fit on the disk, no
    metrics.json at all (an earlier attempt's must not claim what did not happen) and a warning."""
    try:
        write_json(Path(run_dir) / "metrics.json", status)
    except NoSpaceError as e:
        (Path(run_dir) / "metrics.json").unlink(missing_ok=True)
        log.warning("%s; so metrics.json does not record this failure", e)


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
            with writing(EVENTS, path, RESUME_ADVICE, partial=tmp):
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
        with writing("the metrics", jsonl, RESUME_ADVICE, partial=tmp):
            tmp.write_text("".join(lines))
            os.replace(tmp, jsonl)


class Tracker:
    """Scalars go to TensorBoard twice (per step and per token seen) and to metrics.jsonl once."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir, self.enabled, self.closed, self.out_of_space = Path(run_dir), enabled, False, False
        if enabled:
            _quiet_tensorboard_thread()
            with self._events():
                self.tb = SummaryWriter(log_dir=str(self.run_dir))
            with self._records():
                self.jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self.tags: set[str] = set()

    def _events(self):
        return self._writing(EVENTS, self.run_dir)

    def _records(self):
        return self._writing("the metrics", self.run_dir / "metrics.jsonl")

    @contextlib.contextmanager
    def _writing(self, what: str, path: Path) -> Iterator[None]:
        try:
            with writing(what, path):
                yield
        except NoSpaceError:
            self.out_of_space = True  # reported by whoever catches it: close() need not warn about it again
            raise

    def log(self, kind: str, step: int, tokens: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self._events():
            for name, value in values.items():
                if value is None or (isinstance(value, float) and not math.isfinite(value)):
                    continue
                self.tb.add_scalar(f"{kind}/{name}", value, step)
                self.tags.add(f"{kind}/{name}")
                if name in ("loss", "perplexity", "accuracy"):
                    self.tb.add_scalar(f"{kind}_vs_tokens/{name}", value, tokens)
        record = {"kind": kind, "step": step, "tokens": tokens, "time": time.time(),
                  **{k: _clean(float(v)) if v is not None else None for k, v in values.items()}}
        with self._records():
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
            finals[tag] = float(value)
        exp, ssi, sei = hparams_summary(hp, finals)
        with self._events():
            for tag, value in finals.items():
                if tag not in self.tags:
                    self.tb.add_scalar(tag, value, step)
            writer = self.tb._get_file_writer()
            for s in (exp, ssi, sei):
                writer.add_summary(s)

    def flush(self) -> None:
        """Put everything logged so far on disk (before a checkpoint: a kill then loses nothing it covers)."""
        if self.enabled:
            with self._events():
                self.tb.flush()  # metrics.jsonl is line-buffered: every record is on disk already

    def close(self, quiet: bool = False) -> None:
        """Put the last events on disk and close both files. A full disk raises NoSpaceError, or with `quiet`
        (another error is being reported) only logs a warning; the files are closed either way."""
        if not self.enabled or self.closed:
            return
        self.closed, reported = True, self.out_of_space
        try:
            try:
                with self._events():
                    self.tb.close()  # flushes first: an error the writer thread met is raised here
            finally:
                with self._records():
                    self.jsonl.close()
        except NoSpaceError as e:
            if not quiet:
                raise
            if not reported:
                log.warning("%s", e)
