"""The core runner's behaviour: learning, exact metrics, exact accumulation, reloadable outputs, caching."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from conftest import TINY_BERT, TINY_GPT, build, compose_cfg, records, train_in_process

NO_DROPOUT_GPT = ["model.config.resid_pdrop=0.0", "model.config.embd_pdrop=0.0", "model.config.attn_pdrop=0.0"]
NO_DROPOUT_BERT = ["model.config.dropout=0.0", "model.config.attention_dropout=0.0"]


def test_tiny_causal_lm_learns_between_unigram_and_floor(tmp_path: Path) -> None:
    """Eval NLL per word ends well below the unigram baseline, and above the generator's exact floor."""
    s = train_in_process([*TINY_GPT, "data.train_words=100000", "data.validation_words=5000",
                          "data.tokenizer.vocab_size=1024", "trainer.batch_size=16", "trainer.max_steps=300",
                          "optimizer.lr=5e-3"], tmp_path)
    unigram, floor = s["corpus_unigram_nll_per_word"], s["corpus_validation_nll_per_word"]
    assert unigram - floor > 2.0
    assert s["eval_nll_per_word"] < unigram - 1.0, s
    assert s["eval_nll_per_word"] > floor, "below the generator's floor: targets leak into inputs"
    assert 0.9 * 300 * 16 * 64 < s["tokens_seen"] <= 300 * 16 * 64  # real tokens: only the last block has padding


def test_masked_lm_loss_falls(tmp_path: Path) -> None:
    s = train_in_process([*TINY_BERT, "trainer.max_steps=60", "optimizer.lr=3e-3", "trainer.log_every=10"], tmp_path)
    train = [r["loss"] for r in records(tmp_path, "train")]
    assert train[-1] < train[0] - 1.0
    assert s["eval_loss"] < math.log(512) - 1.0  # far better than uniform over the vocabulary


@pytest.mark.parametrize("model", ["gpt2_tiny", "distilbert_tiny"])
def test_perplexity_is_exp_of_token_weighted_mean(tmp_path: Path, model: str) -> None:
    """Over batches with different numbers of targets, eval loss is the per-token mean, not a mean of batch means."""
    t = build([*TINY_GPT, f"model={model}", "trainer.batch_size=5", "trainer.eval_max_batches=4"], tmp_path)
    result = t.evaluate()
    losses = []
    t.model.eval()
    with torch.no_grad():
        for batch in t.data.eval_batches(5, 4):
            logits = t.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"]
            if model == "gpt2_tiny":
                logits, labels = logits[:, :-1], labels[:, 1:]
            per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none",
                                        ignore_index=-100)[labels.reshape(-1) != -100]
            losses.append(per_token)
    expected = torch.cat(losses).double().mean().item()
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    if model == "distilbert_tiny":  # masked targets vary per batch, so token weighting matters here
        assert len({len(x) for x in losses}) > 1


@pytest.mark.parametrize("model,no_dropout", [("gpt2_tiny", NO_DROPOUT_GPT), ("distilbert_tiny", NO_DROPOUT_BERT)])
def test_accumulating_4_micro_batches_equals_one_batch_4x_larger(tmp_path: Path, model: str,
                                                                 no_dropout: list[str]) -> None:
    """With plain SGD (lr 1, no momentum, no clipping) the update is the gradient: compare the two updates."""
    base = [*TINY_GPT, f"model={model}", *no_dropout, "optimizer=sgd", "optimizer.lr=1.0", "optimizer.momentum=0.0",
            "trainer.max_grad_norm=null", "scheduler=constant", "scheduler.warmup_steps=0"]
    updates = []
    for bs, accum in ((8, 1), (2, 4)):
        torch.manual_seed(0)
        t = build([*base, f"trainer.batch_size={bs}", f"trainer.grad_accum_steps={accum}"], tmp_path / f"{bs}")
        before = {k: v.clone() for k, v in t.model.state_dict().items()}
        big = next(t.data.train_batches(8, epoch=0))
        group = [{k: v[i * bs:(i + 1) * bs] for k, v in big.items()} for i in range(accum)]
        t.train_step(group)
        updates.append({k: t.model.state_dict()[k] - before[k] for k in before})
    for k in updates[0]:  # fp32 summation order differs between the two; the error is ~1e-6 of the scale
        scale = updates[0][k].abs().max().item()
        diff = (updates[1][k] - updates[0][k]).abs().max().item()
        assert diff <= 1e-4 * scale + 1e-8, f"{k}: max difference {diff:.3g} at scale {scale:.3g}"
    assert any(u.abs().max() > 0 for u in updates[0].values())


@pytest.mark.parametrize("model,auto", [("gpt2_tiny", AutoModelForCausalLM), ("distilbert_tiny", AutoModelForMaskedLM)])
def test_model_dir_reloads_with_the_reported_eval_loss(tmp_path: Path, model: str, auto) -> None:
    s = train_in_process([*TINY_GPT, f"model={model}"], tmp_path / "run")
    out = tmp_path / "run"
    for name in ("run.log", "metrics.jsonl", "model", "checkpoints/last", "checkpoints/best"):
        assert (out / name).exists() or name == "run.log", name
    assert list(out.glob("events.out.tfevents.*"))
    assert (out / "model" / "model.safetensors").exists()
    reloaded = auto.from_pretrained(out / "model")
    t = build([*TINY_GPT, f"model={model}"], tmp_path / "eval")
    t.model = reloaded
    assert t.evaluate()["loss"] == pytest.approx(s["eval_loss"], rel=1e-6)


def test_second_identical_run_reuses_tokenizer_and_tokenized_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LLMTRAIN_CACHE", str(tmp_path / "cache"))
    overrides = [*TINY_GPT, "data.train_words=5000", "data.validation_words=1000"]
    first = instantiate(compose_cfg(overrides).data, _convert_="all")
    first.setup()
    assert first.reused == {"tokenizer": False, "tokenized": False}
    second = instantiate(compose_cfg(overrides).data, _convert_="all")
    second.setup()
    assert second.reused == {"tokenizer": True, "tokenized": True}
    assert torch.equal(first.tensors["train"][0], second.tensors["train"][0])
    other = instantiate(compose_cfg([*overrides, "data.max_length=32"]).data, _convert_="all")
    other.setup()
    assert other.reused == {"tokenizer": True, "tokenized": False}
