"""`make bench`: llmtrain's default settings against Hugging Face Trainer and the seed guide's loop.

Same model (same initial weights), same data, sequence length, batch and step count for every peer; each peer runs
in a fresh process, and the peers alternate (ABBA over rounds) so that machine drift affects all alike. Throughput is
real (non-padding) tokens per second over the steps after the warm-up ones. Writes benchmarks/RESULTS.md.

    python -m benchmarks.bench                # the full benchmark (~15-20 minutes on 2 cores)
    python -m benchmarks.bench --quick        # a smoke run on a tiny model (a minute)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2"
PEERS = ("llmtrain", "hf_bf16", "hf_fp32", "seed")
LABELS = {"llmtrain": "(a) llmtrain, default settings", "hf_bf16": "(b) HF Trainer, packed, bf16=True",
          "hf_fp32": "(c) HF Trainer, packed, fp32 (default)", "seed": "(d) seed guide's loop (padded, fp32)"}


@dataclass
class Case:
    """One model to benchmark: its overrides, steps (the first `warm` not timed), rounds and the bf16 peer's budget."""

    name: str
    overrides: list[str]
    steps: int
    warm: int
    rounds: int
    bf16_budget_s: float  # (b) on a CPU without native bf16 is slow: it stops at the first step past this
    bf16_steps: int | None = None  # a step count of its own for (b), run in round 0 only (full-size models)
    peers: tuple[str, ...] = PEERS
    results: dict[str, list[dict]] = field(default_factory=dict)


def cases(quick: bool, data: list[str]) -> list[Case]:
    common = [*data, "data.max_length=128", "trainer.batch_size=16"]
    if quick:
        tiny = ["model=distilbert_tiny", "data=builtin", "data.train_words=20000", "data.validation_words=2000",
                "data.max_length=64", "trainer.batch_size=8"]
        return [Case("distilbert_tiny (smoke)", tiny, steps=5, warm=1, rounds=1, bf16_budget_s=20)]
    return [Case("DistilBERT MLM 4x256", ["model=distilbert_small", *common], steps=20, warm=4, rounds=3,
                 bf16_budget_s=40),
            Case("DistilBERT MLM 6x768", ["model=distilbert", *common], steps=3, warm=1, rounds=2, bf16_budget_s=0,
                 bf16_steps=1),
            Case("distilgpt2 CLM 6x768", ["model=distilgpt2", *common], steps=3, warm=1, rounds=2, bf16_budget_s=0,
                 bf16_steps=1, peers=("llmtrain", "hf_bf16", "hf_fp32"))]


# ---- running the peers ----------------------------------------------------------------------------------------------
def run(cmd: list[str], timeout: float) -> tuple[int, float]:
    """Run cmd with the benchmark's environment; (exit status, peak RSS of the process in MB, sampled)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ps, peak, deadline = psutil.Process(proc.pid), 0.0, time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        try:
            peak = max(peak, ps.memory_info().rss / 2**20)
        except psutil.Error:
            pass
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    _, err = proc.communicate()
    if proc.returncode not in (0, -9):
        print(f"  ! {' '.join(cmd[:4])} failed:\n{err[-3000:]}", file=sys.stderr)
    return proc.returncode, peak


def run_llmtrain(case: Case, work: Path) -> dict:
    """`python -m llmtrain.run` itself, defaults untouched; steps read back from its metrics.jsonl."""
    out = work / "llmtrain"
    args = [*case.overrides, f"trainer.max_steps={case.steps}", "trainer.log_every=1", "trainer.eval_every=0",
            "trainer.eval_max_batches=1", "trainer.progress=false", f"hydra.run.dir={out}"]
    code, _ = run([sys.executable, "-m", "llmtrain.run", *args], timeout=3600)
    summary = json.loads((out / "metrics.json").read_text())
    steps = []
    prev = 0
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] != "train":
            continue
        tokens = r["tokens"] - prev
        prev = r["tokens"]
        flops = r["mfu"] * summary["peak_flops"] * tokens / r["tokens_per_sec"]
        steps.append({"step": r["step"], "time": r["time"], "tokens": tokens, "loss": r["loss"], "flops": flops})
    return {"steps": steps, "peak_rss_mb": summary["peak_memory_mb"], "precision": summary.get("precision"),
            "optimizer": "AdamW (fused)", "code": code}


def run_peer(case: Case, peer: str, work: Path) -> dict:
    out = work / f"{peer}.jsonl"
    budget = case.bf16_budget_s if peer == "hf_bf16" else float("inf")
    steps = case.bf16_steps if peer == "hf_bf16" and case.bf16_steps else case.steps
    cmd = [sys.executable, "-m", "benchmarks.peers", peer, "--steps", str(steps), "--out", str(out)]
    if peer == "hf_bf16":
        cmd += ["--budget", str(budget)]
    # a step that outlasts the budget by far is killed; the steps it finished still count
    code, sampled_rss = run([*cmd, "--", *case.overrides], timeout=budget * 2 + 600 if peer == "hf_bf16" else 3600)
    records = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    losses = {r["step"]: r["loss"] for r in records if r["event"] == "loss"}
    steps = [{**r, "loss": r.get("loss", losses.get(r["step"]))} for r in records if r["event"] == "step"]
    end = next((r for r in records if r["event"] == "end"), {})
    start = next((r["time"] for r in records if r["event"] == "start"), None)
    return {"steps": steps, "start": start, "peak_rss_mb": end.get("peak_rss_mb", sampled_rss),
            "precision": end.get("precision"), "optimizer": end.get("optimizer"), "code": code,
            "complete": bool(end) and len(steps) == case.steps}  # a shortened (b) has no loss to compare


def throughput(result: dict, warm: int) -> tuple[float, float, int]:
    """(real tokens/s, model FLOP/s, timed steps) over the steps after the first `warm` ones (wall time between them)."""
    steps = result["steps"]
    if len(steps) > warm:
        timed, t0 = steps[warm:], steps[warm - 1]["time"] if warm else result["start"]
    elif steps and result.get("start"):  # too few steps (a budget ran out): from the start, warm-up included
        timed, t0 = steps, result["start"]
    else:
        return 0.0, 0.0, 0
    seconds = timed[-1]["time"] - t0
    return sum(s["tokens"] for s in timed) / seconds, sum(s["flops"] for s in timed) / seconds, len(timed)


# ---- the machine --------------------------------------------------------------------------------------------------
def machine() -> dict:
    """What the benchmark's numbers depend on, detected: CPU, cores, native bf16, the peaks, precision=auto."""
    import torch

    from llmtrain.training.flops import device_name
    from llmtrain.runtime.hardware import Hardware, compute_cores, cpu_has_native_bf16

    return {"cpu": device_name("cpu"), "cores": compute_cores(), "native_bf16": cpu_has_native_bf16(),
            "auto_precision": Hardware().precision, "peak_fp32": peak("fp32"), "peak_bf16": peak("bf16"),
            "torch": torch.__version__, "load_avg": os.getloadavg()}


def peak(precision: str) -> float:
    """The peak matrix-product rate for precision, measured now; llmtrain's cache keeps the best seen."""
    import torch

    from llmtrain.training.flops import peak_flops
    from llmtrain.runtime.hardware import compute_cores

    torch.set_num_threads(compute_cores())
    cache = os.environ.get("LLMTRAIN_CACHE", os.path.expanduser("~/.cache/llmtrain"))
    return peak_flops("cpu", torch.bfloat16 if precision == "bf16" else torch.float32, cache, refresh=True)


def startup(work: Path) -> tuple[float, float]:
    """(seconds from `python -m llmtrain.run`, the default run, to its first training step with caches warm,
    CPU seconds of importing what it needs), the second a measure that load from other processes does not inflate."""
    args = ["trainer.max_steps=1", "trainer.eval_max_batches=1", "trainer.progress=false"]
    for i in range(2):  # the first fills the caches (corpus, tokenizer, blocks, peak FLOP/s)
        run([sys.executable, "-m", "llmtrain.run", *args, f"hydra.run.dir={work}/startup{i}"], timeout=1200)
    imports = "import llmtrain.run, llmtrain.training.models, transformers.models.distilbert.modeling_distilbert"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", imports], cwd=ROOT, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return json.loads((work / "startup1" / "metrics.json").read_text())["startup_s"], cpu


# ---- the report ---------------------------------------------------------------------------------------------------
def summarize(case: Case, mach: dict) -> dict[str, dict]:
    """Per peer: mean tokens/s over rounds, MFU against the peak of its dtype, peak RSS, losses."""
    rows = {}
    for peer, results in case.results.items():
        rates = [throughput(r, case.warm) for r in results]
        tps = statistics.mean(r[0] for r in rates)
        precision = results[0].get("precision") or mach["auto_precision"]  # llmtrain runs hardware.precision=auto
        peak = mach["peak_bf16"] if precision == "bf16" else mach["peak_fp32"]
        first = results[0]
        losses = [s["loss"] for s in first["steps"] if s.get("loss") is not None]
        complete = first.get("complete", True) and len(first["steps"]) == case.steps
        rows[peer] = {"tokens_per_sec": tps, "rounds": [r[0] for r in rates], "timed_steps": rates[0][2],
                      "mfu": statistics.mean(r[1] for r in rates) / peak, "precision": precision,
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in results), "optimizer": first.get("optimizer"),
                      "mean_loss": statistics.mean(losses) if losses and complete else None,
                      "first_loss": losses[0] if losses else None, "complete": complete}
    return rows


def fmt(x: float | None, spec: str = ".0f") -> str:
    return "n/a" if x is None else format(x, spec)


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def render(all_rows: list[tuple[Case, dict]], mach: dict, startup_s: tuple[float, float] | None,
           seconds: float) -> str:
    lines = ["# Benchmark results (`make bench`)", "",
             f"Machine (detected): {mach['cpu']}, {mach['cores']} cores, torch {mach['torch']}; native bf16 "
             f"(AVX512-BF16/AMX): **{'yes' if mach['native_bf16'] else 'no'}**, so `hardware.precision=auto` runs "
             f"**{mach['auto_precision']}**. Measured peak matrix-product rate: fp32 {mach['peak_fp32'] / 1e12:.3f} "
             f"TFLOP/s, bf16 {mach['peak_bf16'] / 1e12:.4f} TFLOP/s. Load average at the start "
             f"{', '.join(f'{x:.1f}' for x in mach['load_avg'])}; the whole benchmark took {seconds / 60:.1f} min.", "",
             "Every peer trains the same model from the same initial weights on the same data (WikiText-2 when "
             "`../shared/data/wikitext-2` is present, else the built-in corpus), sequence length 128, batch 16, the "
             "same number of steps; tokens/s counts real (non-padding) tokens over the steps after the warm-up ones; "
             "peers run in fresh processes, alternating. MFU = model FLOPs executed / measured peak of the peer's "
             "dtype, the peak being the best measured during the benchmark. Without native bf16, (b) runs at emulated "
             "speed: it stops after a time budget (the 4x256 model) or one step (the 6x768 models), runs in the first "
             "round only for the latter, and its rate is from the steps it finished (counted from the start of "
             "training when fewer than the warm-up steps, which understates it a little).", ""]
    targets = []
    for case, rows in all_rows:
        a = rows["llmtrain"]
        lines += [f"## {case.name}", "", f"{case.steps} steps, the first {case.warm} not timed; {case.rounds} "
                  f"round(s). Overrides: `{' '.join(case.overrides)}`", "",
                  "| peer | real tokens/s | llmtrain is | MFU | peak RSS (MB) | mean loss | step-1 loss | precision, "
                  "optimizer |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for peer, r in rows.items():
            ratio = "—" if peer == "llmtrain" else (f"{a['tokens_per_sec'] / r['tokens_per_sec']:.2f}x"
                                                    if r["tokens_per_sec"] else "n/a")
            note = "" if r["complete"] else f" ({r['timed_steps']} step(s) only, warm-up included: see above)"
            mfu = f"{r['mfu']:.1%}" if r["precision"] != "bf16" or mach["native_bf16"] else "— (emulated)"
            lines.append(f"| {LABELS[peer]}{note} | {fmt(r['tokens_per_sec'])} | {ratio} | {mfu} | "
                         f"{r['peak_rss_mb']:.0f} | {fmt(r['mean_loss'], '.4f')} | {fmt(r['first_loss'], '.4f')} | "
                         f"{r['precision']}, {r['optimizer']} |")
        lines.append("")
        targets += case_targets(case, rows, mach)
    if startup_s is not None:
        targets.append(f"- Start-up (default run, caches warm, command to first step): {startup_s[0]:.1f} s "
                       f"(target <= 8 s): {verdict(startup_s[0] <= 8)}; importing Python, torch, transformers' "
                       f"modeling code, Hydra and datasets alone takes {startup_s[1]:.1f} s of CPU time")
    return "\n".join(lines + ["## Targets", "", *targets, ""])


def case_targets(case: Case, rows: dict, mach: dict) -> list[str]:
    a, out = rows["llmtrain"], []

    def ratio(peer: str) -> float:
        return a["tokens_per_sec"] / rows[peer]["tokens_per_sec"] if rows[peer]["tokens_per_sec"] else float("inf")

    rss_ok = lambda peer: a["peak_rss_mb"] <= rows[peer]["peak_rss_mb"]  # noqa: E731
    if case.name.startswith("DistilBERT"):
        out.append(f"- {case.name}: {ratio('hf_bf16'):.2f}x HF Trainer bf16 (target >= 1.8x), "
                   f"{ratio('seed'):.2f}x the seed loop (target >= 7x), peak RSS {a['peak_rss_mb']:.0f} MB vs "
                   f"{rows['hf_bf16']['peak_rss_mb']:.0f} / {rows['seed']['peak_rss_mb']:.0f} MB: "
                   f"{verdict(ratio('hf_bf16') >= 1.8 and ratio('seed') >= 7 and rss_ok('hf_bf16') and rss_ok('seed'))}"
                   f"; against HF's faster configuration on this machine, fp32: {ratio('hf_fp32'):.2f}x")
    if case.name.startswith("distilgpt2"):
        out.append(f"- {case.name}: {ratio('hf_bf16'):.2f}x HF Trainer bf16 (target >= 1.3x): "
                   f"{verdict(ratio('hf_bf16') >= 1.3)}; against HF fp32: {ratio('hf_fp32'):.2f}x")
    if "6x768" in case.name and case.name.startswith("DistilBERT"):
        out.append(f"- MFU of {case.name} (llmtrain, {a['precision']}, against the measured {a['precision']} peak): "
                   f"{a['mfu']:.1%} (target >= 35%): {verdict(a['mfu'] >= 0.35)}")
    same = "hf_bf16" if a["precision"] == "bf16" else "hf_fp32"
    if a["mean_loss"] is not None and rows[same]["mean_loss"] is not None:
        diff = abs(a["mean_loss"] - rows[same]["mean_loss"]) / rows[same]["mean_loss"]
        out.append(f"- Loss, {case.name}: llmtrain's mean training loss over the {case.steps} steps "
                   f"{a['mean_loss']:.4f} vs HF Trainer {a['precision']} {rows[same]['mean_loss']:.4f}, "
                   f"{diff:.2%} apart (target <= 2%): {verdict(diff <= 0.02)}")
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run on a tiny model")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up measurement")
    args = parser.parse_args(argv)
    began = time.time()
    data = ["data=wikitext2", f"data.path={WIKITEXT}"] if (WIKITEXT / "wiki.valid.tokens").exists() else []
    mach = machine()
    print(f"machine: {mach}", flush=True)
    done: list[Case] = []
    with tempfile.TemporaryDirectory(prefix="llmtrain-bench-") as tmp:
        startup_s = None if args.no_startup or args.quick else startup(Path(tmp))
        if startup_s is not None:
            print(f"start-up: {startup_s[0]:.1f} s (imports: {startup_s[1]:.1f} s of CPU)", flush=True)
        for case in cases(args.quick, data):
            run([sys.executable, "-m", "benchmarks.peers", "prepare", "--steps", "0", "--out", os.devnull, "--",
                 *case.overrides], timeout=3600)
            mach["peak_fp32"] = max(mach["peak_fp32"], peak("fp32"))  # the best seen: load only lowers it
            for r in range(case.rounds):
                order = case.peers if r % 2 == 0 else tuple(reversed(case.peers))
                for peer in order:
                    if peer == "hf_bf16" and case.bf16_steps and r > 0:
                        continue
                    work = Path(tmp) / f"{''.join(c if c.isalnum() else '_' for c in case.name)}-{r}-{peer}"
                    work.mkdir(parents=True)
                    t = time.time()
                    result = run_llmtrain(case, work) if peer == "llmtrain" else run_peer(case, peer, work)
                    case.results.setdefault(peer, []).append(result)
                    print(f"{case.name} round {r} {peer}: {throughput(result, case.warm)[0]:.0f} tokens/s "
                          f"({time.time() - t:.0f} s)", flush=True)
            done.append(case)
    mach["peak_fp32"] = max(mach["peak_fp32"], peak("fp32"))
    all_rows = [(case, summarize(case, mach)) for case in done]
    report = render(all_rows, mach, startup_s, time.time() - began)
    print(report)
    Path(args.out).write_text(report)
    raw = {"machine": mach, "startup_s": startup_s, "cases": {c.name: rows for c, rows in all_rows}}
    Path(args.out).with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
