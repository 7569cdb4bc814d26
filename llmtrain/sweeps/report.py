"""Compare the runs in a directory: summary.csv, summary.md (ranked by eval loss) and summary.png (eval loss vs tokens).

    python -m llmtrain.report multirun/<date>/<time>

A sweep writes these itself after every job (llmtrain.sweeps.callback.SweepSummary); this rebuilds them for any directory
of runs: a sweep, outputs/, or a folder of copied run directories.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from llmtrain.runtime.rundir import read_status

# (metrics.json key, column title, format)
METRICS = [("eval_loss", "eval loss", "{:.4f}"), ("eval_perplexity", "perplexity", "{:.2f}"),
           ("eval_accuracy", "accuracy", "{:.4f}"), ("best_eval_loss", "best eval loss", "{:.4f}"),
           ("steps", "steps", "{:d}"), ("tokens_seen", "tokens seen", "{:,d}"),
           ("tokens_per_sec", "tokens/s", "{:,.0f}"), ("wall_time_s", "wall time (s)", "{:.1f}")]
RUN_MARKERS = (".hydra", "metrics.json", "metrics.jsonl")


@dataclass
class Run:
    """One run directory as the summary sees it."""

    name: str
    path: Path
    status: str  # completed | failed | interrupted | incomplete (running, or killed before it could say)
    overrides: dict[str, str]
    metrics: dict
    tokens_per_step: int | None = None
    eval_curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens seen, loss)
    train_curve: list[tuple[int, float]] = field(default_factory=list)

    @property
    def eval_loss(self) -> float:
        value = self.metrics.get("eval_loss")
        return float(value) if self.status == "completed" and value is not None else math.inf

    @property
    def error(self) -> str:
        return " ".join(str(self.metrics.get("error", "")).split())


def find_runs(root: Path) -> list[Path]:
    """Run directories under root (those with .hydra/ or metrics files), not looking inside a run."""
    if any((root / m).exists() for m in RUN_MARKERS):
        return [root]
    found = []
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        if child.is_dir() and not child.name.startswith("."):
            found += find_runs(child)
    return found


def _curves(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Loss against tokens seen per kind; a resumed run's records replace the ones its crash left after them."""
    points: dict[str, list[tuple[int, int, float]]] = {"train": [], "eval": []}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if r.get("kind") in points and r.get("loss") is not None:
            kept = [p for p in points[r["kind"]] if p[0] < r["step"]]
            points[r["kind"]] = [*kept, (r["step"], r["tokens"], r["loss"])]
    return {k: [(t, loss) for _, t, loss in v] for k, v in points.items()}


def _tokens_per_step(run_dir: Path) -> int | None:
    try:
        cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        return int(cfg.trainer.batch_size * cfg.data.max_length * cfg.trainer.grad_accum_steps)
    except Exception:  # noqa: BLE001 - not a llmtrain config, or one that is partly interpolated
        return None


def load_run(run_dir: Path, root: Path) -> Run:
    """Read a run's metrics.json, overrides and curves."""
    metrics = read_status(run_dir)
    try:
        listed = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "overrides.yaml"))
    except (OSError, ValueError):
        listed = []
    overrides = dict(o.split("=", 1) for o in listed if "=" in o)
    curves = _curves(run_dir / "metrics.jsonl")
    name = run_dir.relative_to(root).as_posix() if run_dir != root else run_dir.name
    return Run(name, run_dir, metrics.get("status", "incomplete"), overrides, metrics, _tokens_per_step(run_dir),
               curves["eval"], curves["train"])


def collect(root: Path) -> list[Run]:
    """Every run under root, best first: completed runs by final eval loss, then the rest by name."""
    root = Path(root)
    runs = [load_run(p, root) for p in find_runs(root)]
    return sorted(runs, key=lambda r: (r.eval_loss, _job_number(r.name), r.name))


def _job_number(name: str) -> int:
    m = re.match(r"^(\d+)_", name)
    return int(m.group(1)) if m else -1


def differing(runs: list[Run]) -> tuple[list[str], dict[str, str]]:
    """(override keys whose values differ between runs, overrides that all runs share)."""
    keys = sorted({k for r in runs for k in r.overrides})
    differ = [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]
    common = {k: runs[0].overrides[k] for k in keys if k not in differ and runs[0].overrides.get(k) is not None}
    return differ, common


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    try:
        return spec.format(int(value) if spec.endswith("d}") else value)
    except (TypeError, ValueError):
        return str(value)


def _atomic_write(path: Path, write) -> None:
    """Write through a private temporary file: parallel jobs may rewrite the summary at the same moment."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def to_csv(runs: list[Run]) -> str:
    keys = sorted({k for r in runs for k in r.overrides})
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["rank", "run", "status", *keys, "tokens_per_step", *(m for m, _, _ in METRICS), "error"])
    for i, r in enumerate(runs, 1):
        w.writerow([i, r.name, r.status, *(r.overrides.get(k, "") for k in keys), r.tokens_per_step or "",
                    *(r.metrics.get(m, "") for m, _, _ in METRICS), r.error])
    return out.getvalue()


def to_markdown(runs: list[Run], title: str) -> str:
    differ, common = differing(runs)
    done = sum(r.status == "completed" for r in runs)
    lines = [f"# Runs in {title}", "",
             f"{len(runs)} runs: {done} completed" + "".join(
                 f", {n} {s}" for s in ("failed", "interrupted", "incomplete")
                 if (n := sum(r.status == s for r in runs))) + ". Ranked by final eval loss (lower is better).", ""]
    if common:
        lines += ["Common to all: " + ", ".join(f"`{k}={v}`" for k, v in common.items()), ""]
    head = ["rank", "run", *differ, "tokens/step", *(t for _, t, _ in METRICS), "status"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(runs, 1):
        run = str(_job_number(r.name)) if _job_number(r.name) >= 0 else r.name
        cells = [str(i), run, *(r.overrides.get(k, "") for k in differ), _fmt(r.tokens_per_step, "{:,d}"),
                 *(_fmt(r.metrics.get(m), f) if r.status == "completed" else "" for m, _, f in METRICS), r.status]
        lines.append("| " + " | ".join(cells) + " |")
    bad = [r for r in runs if r.status != "completed"]
    if bad:
        lines += ["", "Not completed:", ""] + [f"- `{r.name}`: {r.status}: {r.error or 'no metrics.json'}" for r in bad]
    lines += ["", "![eval loss against tokens seen](summary.png)", ""]
    return "\n".join(lines)


def _label(run: Run, differ: list[str]) -> str:
    short = {k: k.rsplit(".", 1)[-1] for k in differ}
    if len(set(short.values())) < len(short):
        short = {k: k for k in differ}
    parts = [f"{short[k]}={run.overrides.get(k, '-')}" for k in differ] or [run.name]
    return ", ".join(parts) + (f"  ({run.eval_loss:.3f})" if run.status == "completed" else f"  ({run.status})")


def plot(runs: list[Run], path: Path, title: str) -> None:
    """Eval loss (left) and train loss (right) against tokens seen; one colour, marker and dash per run (runs with
    the same tokens per step often overlap), legend below, best first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    shown = [r for r in runs if r.eval_curve or r.train_curve]
    differ, _ = differing(runs)
    colors = plt.get_cmap("tab10" if len(shown) <= 10 else "tab20").colors
    cols = 1 if len(shown) <= 3 else 2
    fig, axes = plt.subplots(1, 2, figsize=(13, 5 + 0.22 * math.ceil(len(shown) / cols)), dpi=110,
                             layout="constrained")
    handles = []
    for i, r in enumerate(shown):
        style = {"color": colors[i % len(colors)], "lw": 2.6 if i == 0 else 1.5, "ls": ("-", "--", "-.", ":")[i % 4]}
        if r.eval_curve:
            handles += axes[0].plot(*zip(*r.eval_curve), marker="osD^vPX*"[i % 8], ms=5, **style)
        if r.train_curve:
            line = axes[1].plot(*zip(*r.train_curve), alpha=0.85, **style)
            handles += [] if r.eval_curve else line
        handles[-1].set_label(_label(r, differ))
    for ax, what in zip(axes, ("eval loss", "train loss")):
        ax.set(xlabel="tokens seen", ylabel=what, title=f"{what} vs tokens seen")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(alpha=0.3)
    if not shown:
        axes[0].text(0.5, 0.5, "no evaluations yet", ha="center", transform=axes[0].transAxes)
    else:
        fig.legend(handles=handles, loc="outside lower center", ncols=cols, fontsize=9, title_fontsize=9,
                   title="runs, best first (final eval loss)")
    failed = sum(r.status != "completed" for r in runs)
    fig.suptitle(f"{title}: {len(runs)} runs" + (f", {failed} not completed" if failed else ""), fontsize=11)
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def write_summary(root: Path) -> list[Run]:
    """Write summary.csv, summary.md and summary.png into root for the runs under it; returns the ranked runs."""
    root = Path(root)
    runs = collect(root)
    if not runs:
        return runs
    title = str(Path(*root.resolve().parts[-3:]))  # e.g. multirun/2025-01-31/10-00-00-123456
    _atomic_write(root / "summary.csv", lambda tmp: tmp.write_text(to_csv(runs)))
    _atomic_write(root / "summary.md", lambda tmp: tmp.write_text(to_markdown(runs, title)))
    plot(runs, root / "summary.png", title)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmtrain.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="a sweep directory, or any directory of run directories")
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        parser.error(f"{args.directory} is not a directory")
    runs = write_summary(args.directory)
    if not runs:
        print(f"no runs under {args.directory} (a run directory has .hydra/ or metrics.json)", file=sys.stderr)
        return 2
    print((args.directory / "summary.md").read_text())
    print(f"wrote {args.directory}/summary.csv, summary.md, summary.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
