"""Sweeps: named run directories, TensorBoard scalars and HParams, the summary, failures, resume, parallel jobs."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import pytest

from conftest import ROOT, TINY_GPT, compose_cfg, run_cli
from llmtrain.sweeps import callback as sweep, report

TB_SCALARS = ["train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "eval/loss", "eval/perplexity",
              "eval/accuracy", "train_vs_tokens/loss", "eval_vs_tokens/loss"]
HPARAMS = ["model", "params", "batch_size", "max_length", "grad_accum_steps", "tokens_per_step", "lr", "precision",
           "seed"]
HPARAM_METRICS = ["eval/loss", "eval/perplexity", "eval/accuracy", "final/best_eval_loss", "final/tokens_per_sec",
                  "final/train_time_s"]


def tiny(*overrides: str) -> list[str]:
    """TINY_GPT with a few short steps, minus the keys the caller sets (a key given twice is a Hydra error)."""
    base = [*TINY_GPT, "trainer.max_steps=4", "trainer.eval_every=2", "trainer.log_every=1",
            "trainer.eval_max_batches=4"]
    keys = {o.split("=", 1)[0] for o in overrides}
    seen: dict[str, str] = {}
    for o in base:
        seen[o.split("=", 1)[0]] = o  # later entries of base win over TINY's
    return [o for k, o in seen.items() if k not in keys] + list(overrides)


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("_", 1)[0]))


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def hparams_rows(logdir: Path) -> dict[str, tuple[dict, dict]]:
    """What TensorBoard's HParams dashboard lists for logdir: run -> (hparams, metric values), via its own backend."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    tb = base_plugin.TBContext(data_provider=data_provider.MultiplexerDataProvider(mux, str(logdir)),
                               logdir=str(logdir), multiplexer=mux)
    request = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=100, allowed_statuses=[
        api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE, api_pb2.STATUS_RUNNING])
    groups = list_session_groups.Handler(context.RequestContext(), backend_context.Context(tb), "", request).run()
    out = {}
    for g in groups.session_groups:
        hp = {k: (v.number_value if v.HasField("number_value") else v.string_value) for k, v in g.hparams.items()}
        out[g.name] = (hp, {m.name.tag: m.value for m in g.metric_values})
    return out


# ---- a 4-job sweep: names, TensorBoard, HParams, summary --------------------------------------------------------
@pytest.fixture(scope="module")
def sweep4(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    sweep_dir = tmp_path_factory.mktemp("sweep4") / "sweep"
    result = run_cli(["-m", *tiny("trainer.batch_size=4,8", "data.max_length=32,48"),
                      f"hydra.sweep.dir={sweep_dir}"], cwd=sweep_dir.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return sweep_dir, result


def test_sweep_names_each_run_by_what_differs(sweep4) -> None:
    sweep_dir, _ = sweep4
    assert [p.name for p in job_dirs(sweep_dir)] == [
        "0_data.max_length=32,trainer.batch_size=4", "1_data.max_length=48,trainer.batch_size=4",
        "2_data.max_length=32,trainer.batch_size=8", "3_data.max_length=48,trainer.batch_size=8"]
    for run in job_dirs(sweep_dir):
        assert status(run)["status"] == "completed"


def test_tensorboard_reads_scalars_per_step_and_per_token(sweep4) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sweep_dir, _ = sweep4
    for run in job_dirs(sweep_dir):
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
        acc.Reload()
        assert set(TB_SCALARS) <= set(acc.Tags()["scalars"]), run.name
        final = status(run)
        # the tokens axis ends at the tokens the run saw; the last eval point is the final evaluation
        assert acc.Scalars("eval_vs_tokens/loss")[-1].step == final["tokens_seen"]
        assert acc.Scalars("eval/loss")[-1].step == final["steps"] == 4
        assert acc.Scalars("eval/loss")[-1].value == pytest.approx(final["eval_loss"], rel=1e-5)


def test_hparams_dashboard_has_one_row_per_run_with_final_metrics(sweep4) -> None:
    sweep_dir, _ = sweep4
    rows = hparams_rows(sweep_dir)
    assert sorted(rows) == [p.name for p in job_dirs(sweep_dir)]  # the runs themselves, not nested sub-runs
    for name, (hp, metrics) in rows.items():
        run = sweep_dir / name
        batch_size, max_length = int(hp["batch_size"]), int(hp["max_length"])
        assert f"trainer.batch_size={batch_size}" in name and f"data.max_length={max_length}" in name
        assert set(HPARAMS) <= set(hp)
        assert hp["tokens_per_step"] == batch_size * max_length * hp["grad_accum_steps"]
        assert set(HPARAM_METRICS) <= set(metrics), name
        final = status(run)
        assert metrics["eval/loss"] == pytest.approx(final["eval_loss"], rel=1e-5)
        assert metrics["final/best_eval_loss"] == pytest.approx(final["best_eval_loss"], rel=1e-5)
        assert metrics["final/tokens_per_sec"] > 0


def test_summary_ranks_the_runs_and_report_rebuilds_it(sweep4) -> None:
    sweep_dir, _ = sweep4
    rows = read_csv(sweep_dir / "summary.csv")
    assert len(rows) == 4
    losses = [float(r["eval_loss"]) for r in rows]
    assert losses == sorted(losses)
    for r in rows:
        assert float(r["eval_loss"]) == pytest.approx(status(sweep_dir / r["run"])["eval_loss"])
        assert int(r["tokens_per_step"]) == int(r["trainer.batch_size"]) * int(r["data.max_length"])
    md = (sweep_dir / "summary.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| rank"))
    assert "data.max_length" in header and "trainer.batch_size" in header and "model" not in header
    assert "`model=gpt2_tiny`" in md  # shared settings are listed once, above the table
    png = sweep_dir / "summary.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[1] >= 800

    for name in ("summary.csv", "summary.md", "summary.png"):
        (sweep_dir / name).unlink()
    assert report.main([str(sweep_dir)]) == 0
    assert read_csv(sweep_dir / "summary.csv") == rows
    assert (sweep_dir / "summary.png").stat().st_size > 10_000


# ---- a failed job, a killed sweep, a rerun ---------------------------------------------------------------------
@pytest.mark.slow  # two sweep invocations of 4 jobs: ~1 minute on 2 idle cores
def test_failed_job_does_not_sink_the_sweep_and_a_killed_sweep_resumes(tmp_path: Path) -> None:
    """n_head=3 cannot split n_embd=32: that job fails. The sweep is killed mid-job, then rerun into its directory."""
    sweep_dir = tmp_path / "sweep"
    args = [sys.executable, "-m", "llmtrain.run", "-m",
            *tiny("model.config.n_head=1,2,3,4", "trainer.max_steps=8", "trainer.save_every=2",
                  "trainer.eval_every=4", "data.max_length=32"), f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and first.poll() is None and time.monotonic() < deadline:
        runs = job_dirs(sweep_dir) if sweep_dir.exists() else []
        done = [r for r in runs if (r / "metrics.json").exists()]
        midway = [r for r in runs if not (r / "metrics.json").exists() and any((r / "checkpoints").glob("step-*"))]
        if done and midway:
            first.send_signal(signal.SIGKILL)  # no chance to save or write anything more
            killed = midway[0]
        time.sleep(0.05)
    first.wait(timeout=60)
    assert killed is not None, "the sweep ended before it could be killed mid-job"
    before = {r.name: (r / "metrics.json").read_text() for r in job_dirs(sweep_dir) if (r / "metrics.json").exists()}
    assert killed.name not in before

    rerun = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = rerun.stdout + rerun.stderr
    # the failed job is named at the end, and the exit status says the sweep had a failure
    assert rerun.returncode != 0
    assert re.search(r"1 of 4 sweep jobs did not complete: 2_model\.config\.n_head=3 \(failed", rerun.stderr), out[-3000:]
    runs = {r.name: r for r in job_dirs(sweep_dir)}
    assert sorted(runs) == [f"{i}_model.config.n_head={h}" for i, h in enumerate((1, 2, 3, 4))]
    trained_again = set(re.findall(r"outputs: \S+/(\d_\S+)", rerun.stdout))
    for name, text in before.items():
        if json.loads(text)["status"] == "completed":
            assert (runs[name] / "metrics.json").read_text() == text  # finished jobs are not repeated
            assert name not in trained_again
            assert "skipped" in (runs[name] / "run.log").read_text()
    assert killed.name in trained_again
    assert re.search(r"resumed from \S+/checkpoints/step-\d+ at step [1-9]", (killed / "run.log").read_text())
    for name, run in runs.items():
        expected = "failed" if name.startswith("2_") else "completed"
        assert status(run)["status"] == expected, name
        if expected == "completed":
            assert status(run)["steps"] == 8
    assert "divisible" in status(runs["2_model.config.n_head=3"])["error"]

    rows = {r["run"]: r for r in read_csv(sweep_dir / "summary.csv")}
    assert len(rows) == 4
    assert [r["status"] for r in rows.values()] == ["completed"] * 3 + ["failed"]  # failures rank last
    assert "divisible" in rows["2_model.config.n_head=3"]["error"]
    assert "`2_model.config.n_head=3`: failed" in (sweep_dir / "summary.md").read_text()


# ---- parallel jobs ----------------------------------------------------------------------------------------------
def _log_span(run: Path) -> tuple[datetime, datetime]:
    stamps = re.findall(r"^\[([\d-]+ [\d:,]+)\]", (run / "run.log").read_text(), re.M)
    parse = lambda s: datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f")  # noqa: E731
    return parse(stamps[0]), parse(stamps[-1])


def test_parallel_sweep_splits_the_cores_between_jobs(tmp_path: Path) -> None:
    cores = sweep.available_cores()
    if cores < 2:
        pytest.skip("needs 2 cores to run 2 jobs side by side")
    sweep_dir = tmp_path / "sweep"
    result = run_cli(["-m", "hydra/launcher=parallel", *tiny("trainer.batch_size=4,8", "trainer.max_steps=6"),
                      f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    threads = cores // 2  # 2 jobs x threads <= cores; 1 each on a 2-core machine
    assert f"2 jobs side by side on {cores} cores, {threads} thread" in result.stdout
    runs = job_dirs(sweep_dir)
    assert [r.name for r in runs] == ["0_trainer.batch_size=4", "1_trainer.batch_size=8"]  # threads not in names
    for run in runs:
        assert status(run)["status"] == "completed"
        assert f"threads={threads} " in (run / "run.log").read_text()
        assert f"hardware.num_threads={threads}" in (run / ".hydra" / "overrides.yaml").read_text()
    (a0, a1), (b0, b1) = (_log_span(r) for r in runs)
    assert a0 < b1 and b0 < a1, "the two jobs did not run at the same time"


def test_plan_parallel_never_oversubscribes() -> None:
    for n_jobs in (-1, -2, 1, 2, 3, 8, 64):
        for tasks in (1, 2, 3, 5, 16):
            for cores in (1, 2, 3, 16):
                jobs, threads = sweep.plan_parallel(n_jobs, tasks, cores)
                assert 1 <= jobs <= min(tasks, cores) and jobs * threads <= cores and threads >= 1
    assert sweep.plan_parallel(-1, 2, 16) == (2, 8)  # a small sweep gets more threads per job
    assert sweep.plan_parallel(-1, 10, 2) == (2, 1)
    assert sweep.with_threads(["a=1"], 3) == ["a=1", "hardware.num_threads=3"]
    assert sweep.with_threads(["hardware.num_threads=4"], 1) == ["hardware.num_threads=4"]  # the user's choice


# ---- directories and configs ------------------------------------------------------------------------------------
TRIVIAL_TASK = """
    import json, sys
    from pathlib import Path
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(version_base="1.3", config_path={conf!r}, config_name="config")
    def main(cfg) -> float:
        out = Path(HydraConfig.get().runtime.output_dir)
        (out / "metrics.json").write_text(json.dumps({{"status": "completed", "eval_loss": cfg.trainer.batch_size}}))
        return float(cfg.trainer.batch_size)

    main()
"""


def test_sweeps_started_together_get_their_own_directories(tmp_path: Path) -> None:
    """The default multirun/<date>/<time> layout, from llmtrain's config; the task is a stub (no training)."""
    script = tmp_path / "task.py"
    script.write_text(textwrap.dedent(TRIVIAL_TASK.format(conf=str(ROOT / "llmtrain" / "conf"))))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(script), "-m", "trainer.batch_size=1,2", "model=gpt2_tiny"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    sweeps = sorted(tmp_path.glob("multirun/*/*"))
    assert len(sweeps) == 2
    for s in sweeps:
        assert re.fullmatch(r"\d\d-\d\d-\d\d-\d{6}", s.name)
        assert sorted(p.name for p in s.iterdir() if p.is_dir()) == ["0_trainer.batch_size=1", "1_trainer.batch_size=2"]
        assert len(read_csv(s / "summary.csv")) == 2


def test_scale_out_configs_compose() -> None:
    from hydra.utils import get_class

    slurm = compose_cfg(["hydra/launcher=slurm"], hydra=True).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.gpus_per_node == 1 and slurm.max_num_timeout > 0
    assert compose_cfg(["hydra/launcher=submitit_slurm"], hydra=True).hydra.launcher._target_.endswith("SlurmLauncher")
    parallel = compose_cfg(["hydra/launcher=parallel"], hydra=True).hydra.launcher
    for node in (slurm, parallel):
        get_class(node._target_)  # the plugin is installed and importable
    for name in ("optuna", "lr_search"):
        sweeper = compose_cfg([f"hydra/sweeper={name}"], hydra=True).hydra.sweeper
        assert str(sweeper.direction).endswith("minimize")  # an enum or its name
        get_class(sweeper._target_)
    assert "optimizer.lr" in compose_cfg(["hydra/sweeper=lr_search"], hydra=True).hydra.sweeper.params
    assert compose_cfg(["model=gpt2_tiny"]).model  # the plain config is untouched by the hydra options


@pytest.mark.slow
def test_optuna_sweep_minimizes_the_eval_loss_run_returns(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = run_cli(["-m", "hydra/sweeper=lr_search", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1",
                      *tiny("data.max_length=32"), f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = read_csv(sweep_dir / "summary.csv")
    assert len(rows) == 3 and all(r["status"] == "completed" for r in rows)
    assert len({r["optimizer.lr"] for r in rows}) == 3
    from omegaconf import OmegaConf

    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert best.best_value == pytest.approx(float(rows[0]["eval_loss"]))  # what run.py returned, per trial
    assert float(best.best_params["optimizer.lr"]) == pytest.approx(float(rows[0]["optimizer.lr"]))


# ---- the report on its own --------------------------------------------------------------------------------------
def test_report_on_hand_made_runs(tmp_path: Path) -> None:
    """Ranking, failures and a resumed run's repeated log lines, without training anything."""
    def make(name: str, overrides: list[str], metrics: dict | None, records: list[dict]) -> None:
        run = tmp_path / name
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        if metrics is not None:
            (run / "metrics.json").write_text(json.dumps(metrics))
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    ev = lambda step, loss: {"kind": "eval", "step": step, "tokens": 100 * step, "loss": loss}  # noqa: E731
    make("0_lr=1", ["lr=1", "m=a"], {"status": "completed", "eval_loss": 2.0}, [ev(1, 3.0), ev(2, 2.0)])
    # killed after step 3, resumed from step 1: the second step-2 and step-3 points replace the first ones
    make("1_lr=2", ["lr=2", "m=a"], {"status": "completed", "eval_loss": 1.5},
         [ev(1, 3.0), ev(2, 9.0), ev(3, 9.0), ev(2, 2.5), ev(3, 1.5)])
    make("2_lr=3", ["lr=3", "m=a"], {"status": "failed", "error": "ValueError: bad\nthing"}, [])
    make("3_lr=4", ["lr=4", "m=a"], None, [ev(1, 3.0)])  # still running, or killed

    runs = report.write_summary(tmp_path)
    assert [(r.name, r.status) for r in runs] == [("1_lr=2", "completed"), ("0_lr=1", "completed"),
                                                 ("2_lr=3", "failed"), ("3_lr=4", "incomplete")]
    assert runs[0].eval_curve == [(100, 3.0), (200, 2.5), (300, 1.5)]
    assert report.differing(runs) == (["lr"], {"m": "a"})
    md = (tmp_path / "summary.md").read_text()
    assert "4 runs: 2 completed, 1 failed, 1 incomplete" in md
    assert "`2_lr=3`: failed: ValueError: bad thing" in md
    assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert sweep.constant_keys(["m=a", "lr=1,2", "+x=3"]) == ["m", "x"]
    assert sweep.constant_keys(["m=a"]) == []  # nothing swept: a one-job multirun keeps its full name
    assert sweep.constant_keys(["m=a"], ["lr"]) == ["m"]  # an Optuna sweep's params come from its config
