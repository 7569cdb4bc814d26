"""What each of llmtrain's optimizations contributes: one training step, variants alternating, in one process.

    python -m benchmarks.ablation [--compile] [--rounds N] -- <llmtrain overrides, e.g. model=distilbert_small>

From the Hugging Face way (dense loss over every position from model(..., labels=...), AdamW's per-tensor loop) to
llmtrain's (loss at the masked positions only, fused AdamW), one change at a time, then torch.compile (its compile
time measured apart). Same model, weights and batch for every variant; the median step time over the rounds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from benchmarks.peers import build
from llmtrain.tasks import compile_model, loss_terms, model_inputs

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
    parser.add_argument("--compile", action="store_true", help="also measure hardware.compile=true")
    args, overrides = parser.parse_args(argv[:cut]), argv[cut + 1:]
    cfg, hardware, data, model = build(overrides)
    task, bs = data.task, cfg.trainer.batch_size
    batch = next(iter(data.train_batches(bs, 0)))
    tokens = int(batch["attention_mask"].sum())
    model.train()
    variants = dict(VARIANTS) if task == "mlm" else {k: v for k, v in VARIANTS.items() if v[0] == "dense"}
    opts = {name: torch.optim.AdamW(model.parameters(), lr=1e-6, **kw) for name, (_, kw) in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, (path, _) in variants.items():  # warm-up: allocations, kernel choice, optimizer state
        step(model, opts[name], batch, task, path)
    for r in range(args.rounds):
        names = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in names:
            times[name].append(step(model, opts[name], batch, task, variants[name][0]))
    print(f"{' '.join(overrides)}: batch {bs} x {batch['input_ids'].shape[1]}, {tokens} real tokens a step, "
          f"median of {args.rounds} steps, load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    base = statistics.median(times[next(iter(variants))])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} s | {tokens / med:.0f} tokens/s | {base / med:.2f}x |")
    if args.compile:
        compile_model(model, task)
        opt = opts[list(variants)[-1]]
        path = list(variants.values())[-1][0]
        first = step(model, opt, batch, task, path)
        warm = [step(model, opt, next(iter(data.train_batches(bs, 1 + i))), task, path) for i in range(2)]
        compiled = [step(model, opt, batch, task, path) for _ in range(args.rounds)]
        med = statistics.median(compiled)
        eager_med = statistics.median(times[list(variants)[-1]])
        print(f"| + hardware.compile=true | {med:.3f} s | {tokens / med:.0f} tokens/s | {base / med:.2f}x |")
        gain = eager_med - med
        print(f"compile: first step {first:.0f} s, the next two (recompiles for other shapes) {sum(warm):.0f} s; "
              f"saves {gain:.3f} s a step, so it pays off after {(first + sum(warm)) / gain:.0f} steps"
              if gain > 0 else f"compile: first step {first:.0f} s and no step-time gain ({med:.3f} vs {eager_med:.3f})")


if __name__ == "__main__":
    main(sys.argv[1:])
