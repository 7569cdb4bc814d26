"""Performance features keep the math: sparse masked-LM head = dense loss, compile = eager, FLOPs counted right,
MFU logged, the memory estimate close to the measured peak."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification

from conftest import TINY, TINY_BERT, run_cli, train_in_process
from llmtrain.training import flops
from llmtrain.runtime import hardware
from llmtrain.training.optim import adamw
from llmtrain.training.losses import compile_model, loss_terms, sparse_mlm_parts

V, B, T = 300, 4, 32
SIZES = {"distilbert": dict(n_layers=2, dim=32, n_heads=2, hidden_dim=64),
         "bert": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64),
         "roberta": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                         pad_token_id=1, max_position_embeddings=T + 2),
         "electra": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                         embedding_size=32),
         "gpt2": dict(n_layer=2, n_embd=32, n_head=2)}
AUTO = {"mlm": AutoModelForMaskedLM, "clm": AutoModelForCausalLM, "cls": AutoModelForSequenceClassification}


def tiny_model(arch: str, task: str) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"num_labels": 3} if task == "cls" else {}
    return AUTO[task].from_config(AutoConfig.for_model(arch, vocab_size=V, **SIZES[arch], **extra))


def tiny_batch(task: str, seed: int = 0, pad: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens; MLM targets at ~15% of positions, CLM labels -100 on `pad` trailing padding positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if pad:
        mask[-1, -pad:] = 0
    if task == "mlm":
        labels = torch.where(torch.rand(B, T, generator=g) < 0.15, ids, -100)
        labels[0, 0] = ids[0, 0]  # at least one target
    elif task == "clm":
        labels = ids.masked_fill(mask == 0, -100)
    else:
        labels = torch.randint(0, 3, (B,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["distilbert", "bert", "roberta", "electra"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_lm_loss_and_gradients_equal_the_dense_computation(arch, dtype):
    """The head at the masked positions only gives the loss (and gradients) of HF's own dense loss; electra is not in
    the sparse table and takes the dense fallback."""
    model = tiny_model(arch, "mlm").eval()  # no dropout: both passes see the same network
    assert (sparse_mlm_parts(model) is None) == (arch == "electra")
    batch = tiny_batch("mlm")
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss_sum, n, _ = loss_terms(model, batch, "mlm")
    (loss_sum / n).backward()
    ours = grads(model)
    model.zero_grad()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        dense = model(**batch).loss
    dense.backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert int(n) == int((batch["labels"] != -100).sum())
    torch.testing.assert_close(loss_sum / n, dense.float(), rtol=tol, atol=tol)
    for name, g in grads(model).items():
        torch.testing.assert_close(ours[name], g, rtol=tol * 10, atol=tol, msg=name)


def test_causal_lm_loss_equals_hf_and_ignores_padding():
    model = tiny_model("gpt2", "clm").eval()
    batch = tiny_batch("clm", pad=5)
    loss_sum, n, _ = loss_terms(model, batch, "clm")
    assert int(n) == B * (T - 1) - 5
    torch.testing.assert_close(loss_sum / n, model(**batch).loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch,task", [("distilbert", "mlm"), ("bert", "mlm"), ("gpt2", "clm"), ("bert", "cls"),
                                       ("distilbert", "cls")])
def test_flop_model_counts_what_runs(arch, task):
    """The analytic FLOPs equal torch's FLOP counter over a real forward + backward of loss_terms."""
    model = tiny_model(arch, task).train()
    batch = tiny_batch(task)
    with FlopCounterMode(display=False) as counter:
        loss_sum, n, _ = loss_terms(model, batch, task)
        loss_sum.backward()
    assert flops.FlopModel.of(model, task).train_flops(batch) == counter.get_total_flops()


def test_peak_flops_is_measured_once_per_dtype_and_cached(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(flops, "measure_peak", lambda device, dtype: calls.append(dtype) or (1e9, 256))
    assert flops.peak_flops("cpu", torch.float32, tmp_path) == 1e9
    assert flops.peak_flops("cpu", torch.float32, tmp_path) == 1e9
    flops.peak_flops("cpu", torch.bfloat16, tmp_path)
    assert calls == [torch.float32, torch.bfloat16]
    assert len(json.loads((tmp_path / "peak_flops.json").read_text())) == 2


def test_a_stale_cached_peak_is_measured_again_when_a_run_beats_it(tmp_path):
    """A peak cached while the machine was busy would give MFU above 100%: the meter measures it again, once."""
    model = tiny_model("gpt2", "clm")
    flops.peak_flops("cpu", torch.float32, tmp_path)  # the real key and entry
    path = tmp_path / "peak_flops.json"
    cache = json.loads(path.read_text())
    ((key, entry),) = cache.items()
    real = entry["flops"]
    entry["flops"] = 1.0  # as if measured on a machine a billion times busier
    path.write_text(json.dumps(cache))
    meter = flops.MFUMeter(model, "clm", "cpu", torch.float32, tmp_path)
    assert meter.peak == 1.0
    meter.add([tiny_batch("clm")])
    mfu = meter.window_mfu(1.0)  # a few MFLOPs in a second: far above 1 FLOP/s, far below the real peak
    assert meter.peak > real / 100 and mfu < 1
    assert json.loads(path.read_text())[key]["flops"] == meter.peak


def test_real_peak_measurement_is_plausible():
    rate, n = flops.measure_peak("cpu", torch.float32, budget_s=0.2)
    assert 1e8 < rate < 1e14 and n >= 256


def test_optimizers_are_fused_on_cpu():
    model = tiny_model("gpt2", "clm")
    assert adamw(model, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8).defaults["fused"] is True


def test_threads_fit_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(hardware.psutil, "cpu_count", lambda logical=True: 8 if logical else 4)
    assert hardware.compute_cores() == 2  # 4 allowed CPUs, two hardware threads per core


def test_precision_auto_follows_the_detected_cpu(monkeypatch):
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda native=native: native)
        assert hardware.Hardware(precision="auto").precision == expected


def test_mfu_throughput_and_startup_are_logged(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = train_in_process([*TINY_BERT, "trainer.max_steps=4", "trainer.log_every=2"], tmp_path)
    assert 0 < summary["mfu"] < 1 and summary["peak_flops"] > 0 and 0 < summary["startup_s"]
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if r["kind"] == "train"]
    assert len(train) == 2 and all(0 < r["mfu"] < 1 and r["tokens_per_sec"] > 0 for r in train)
    events = EventAccumulator(str(tmp_path)).Reload()
    assert {"train/mfu", "train/tokens_per_sec"} <= set(events.Tags()["scalars"])


@pytest.mark.parametrize("arch,task", [("distilbert", "mlm"), *(pytest.param(*p, marks=pytest.mark.slow) for p in (
    ("bert", "mlm"), ("electra", "mlm"), ("gpt2", "clm"), ("bert", "cls"), ("distilbert", "cls")))])
def test_compiled_loss_equals_eager(arch, task):
    """Every architecture and task the model configs use compiles (dynamo + AOT autograd), with the eager math."""
    torch._dynamo.reset()
    eager, compiled = tiny_model(arch, task).eval(), tiny_model(arch, task).eval()
    compile_model(compiled, task, backend="aot_eager")
    for seed in range(3):  # masked positions change in number from batch to batch: no recompile per batch
        batch = tiny_batch(task, seed, pad=3 if seed == 2 else 0)
        for model in (eager, compiled):
            loss_sum, n, _ = loss_terms(model, batch, task)
            (loss_sum / n).backward()
        torch.testing.assert_close(grads(compiled), grads(eager), rtol=1e-4, atol=1e-6)
        eager.zero_grad()
        compiled.zero_grad()


@pytest.mark.slow
def test_hardware_compile_trains_like_eager(tmp_path):
    """hardware.compile=true (inductor) trains to the eager run's losses."""
    run = [*TINY_BERT, "trainer.max_steps=2", "trainer.log_every=1", "trainer.eval_max_batches=1", "model.config.dropout=0",
           "model.config.attention_dropout=0"]
    eager = train_in_process(run, tmp_path / "eager")
    compiled = train_in_process([*run, "hardware.compile=true"], tmp_path / "compiled")
    losses = [[json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()[:2]]
              for d in ("eager", "compiled")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert compiled["eval_loss"] == pytest.approx(eager["eval_loss"], rel=1e-4)


MEMORY_CONFIGS = {
    "distilbert_4x256": ["model=distilbert_small", *TINY, "data.max_length=128", "trainer.batch_size=16"],
    "gpt2_4x256": ["model=gpt2_small", *TINY, "data.max_length=128", "trainer.batch_size=16"],
    "distilbert_6x768": ["model=distilbert", *TINY, "data.max_length=128", "trainer.batch_size=4"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MEMORY_CONFIGS))
def test_memory_estimate_is_within_25_percent_of_the_measured_peak(name, tmp_path):
    overrides = [*MEMORY_CONFIGS[name], "trainer.max_steps=2", "trainer.eval_max_batches=1"]
    out = run_cli([*overrides, "--json"], tmp_path, module="llmtrain.memory")  # also fills the data cache
    assert out.returncode == 0, out.stderr[-2000:]
    estimate = json.loads(out.stdout.strip().splitlines()[-1])
    assert estimate["parameters"] > 0 and estimate["largest_batch"] >= estimate["batch_size"]
    run = run_cli([*overrides, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    measured = json.loads((tmp_path / "run" / "metrics.json").read_text())["peak_memory_mb"] * 2**20
    print(f"{name}: estimated {estimate['total'] / 2**20:.0f} MB, measured {measured / 2**20:.0f} MB", file=sys.stderr)
    assert abs(estimate["total"] - measured) <= 0.25 * measured
