"""What each of llmtrain's optimizations contributes: one training step, variants alternating, in one process.

    python -m benchmarks.ablation [--compile] [--rounds N] -- <llmtrain overrides, e.g. model=distilbert_small>

From the Hugging Face way (dense loss over every position from model(..., labels=...), AdamW's per-tensor loop) to
llmtrain's (loss at the masked positions only, fused AdamW), one change at a time, then torch.compile (its compile
time measured on a cold cache). Same weights and batch for every variant; variants alternate, round after round, so that
load from other processes hits all alike; the median step time over the rounds.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import os
import statistics
import tempfile
import sys
import time

import torch

from benchmarks.peers import build
from llmtrain.training.losses import compile_model, loss_terms, model_inputs

VARIANTS = {  # name: (loss path, optimizer implementation)
    "HF-style: dense loss, per-tensor AdamW": ("dense", {"foreach": False}),
    "+ foreach AdamW": ("dense", {"foreach": True}),
    "+ fused AdamW": ("dense", {"fused": True}),
    "+ loss at the targets only (llmtrain default)": ("sparse", {"fused": True}),
}


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict, task: str, path: str) -> float:
    t = time.perf_counter()
    if path == "dense":
        loss = model(**batch).loss
    else:
        loss_sum, n, _ = loss_terms(model, model_inputs(batch), task)
        loss = loss_sum / n
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main(argv: list[str]) -> None:
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also measure hardware.compile=true (cold cache)")
    args, overrides = parser.parse_args(argv[:cut]), argv[cut + 1:]
    cfg, hardware, data, model = build(overrides)
    task, bs = data.task, cfg.trainer.batch_size
    batch = next(iter(data.train_batches(bs, 0)))
    tokens = int(batch["attention_mask"].sum())
    model.train()
    variants = dict(VARIANTS) if task == "mlm" else {k: v for k, v in VARIANTS.items() if v[0] == "dense"}
    models = {name: model for name in variants}
    last = list(variants)[-1]
    if args.compile:  # a copy of the same weights, compiled; it alternates with the eager variants below
        variants["+ hardware.compile=true"] = variants[last]
        models["+ hardware.compile=true"] = copy.deepcopy(model)
    opts = {name: torch.optim.AdamW(models[name].parameters(), lr=1e-6, **kw) for name, (_, kw) in variants.items()}
    compile_s = 0.0
    for name, (path, _) in variants.items():  # warm-up: allocations, kernel choice, optimizer state; compilation
        if name == "+ hardware.compile=true":
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")  # a cold compile
            compile_model(models[name], task)
            # the first step compiles; the next ones meet other shapes (mask count, a short last block) once
            compile_s = sum(step(models[name], opts[name], b, task, path)
                            for b in itertools.islice(data.train_batches(bs, 0), 3))
        step(models[name], opts[name], batch, task, path)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        names = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in names:
            times[name].append(step(models[name], opts[name], batch, task, variants[name][0]))
    print(f"{' '.join(overrides)}: batch {bs} x {batch['input_ids'].shape[1]}, {tokens} real tokens a step, "
          f"median of {args.rounds} alternating rounds, load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    base = statistics.median(times[next(iter(variants))])
    print("| variant | step | tokens/s | vs first |\n|---|---:|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} s | {tokens / med:.0f} | {base / med:.2f}x |")
    if args.compile:
        gain = statistics.median(times[last]) - statistics.median(times["+ hardware.compile=true"])
        print(f"compile: the first 3 steps took {compile_s:.0f} s (cold cache, compiling); "
              + (f"it saves {gain:.3f} s a step, so it pays off after ~{compile_s / gain:.0f} steps"
                 if gain > 0 else "no step-time gain"))


if __name__ == "__main__":
    main(sys.argv[1:])
