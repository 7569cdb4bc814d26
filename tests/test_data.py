"""Packing and masking: no padding waste, nothing lost, short corpora still train, 80/10/10 masking."""
from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate

from conftest import TINY_BERT, TINY_GPT, compose_cfg, train_in_process
from llmtrain.data.module import mask_tokens


def setup_data(overrides: list[str]):
    data = instantiate(compose_cfg(overrides).data, _convert_="all")
    data.setup()
    return data


def test_packing_keeps_every_token_and_pads_only_the_last_block(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    lines = [f"line {i} says {' '.join(['word'] * (i % 7))} end" for i in range(300)]
    corpus.write_text("\n".join(lines) + "\n")
    data = setup_data([*TINY_GPT, "data=text", f"data.path={corpus}", "data.validation_split=0.1"])
    blocks, lengths = data.tensors["train"]
    assert (lengths[:-1] == 64).all() and 0 < lengths[-1] <= 64
    tok = data.tokenizer
    train_lines = [ln for ln in lines if True]
    expected = sum(len(tok(line, add_special_tokens=False)["input_ids"]) + 1 for line in train_lines)
    total = int(lengths.sum()) + int(data.tensors["validation"][1].sum())
    assert total == expected  # every token (and one separator per document) lands in exactly one block


def test_corpus_shorter_than_one_block_still_trains(tmp_path: Path) -> None:
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("a very short corpus.\nanother short line.\nand a third one.\n")
    s = train_in_process([*TINY_GPT, "data=text", f"data.path={corpus}", "data.validation_split=0.34",
                          "data.max_length=128", "data.tokenizer.vocab_size=300", "trainer.max_steps=3"], tmp_path / "r")
    assert s["steps"] == 3 and s["tokens_seen"] > 0


def test_masking_is_80_10_10_and_never_touches_special_or_padding() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (64, 256))
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, :10] = False
    inputs, labels = mask_tokens(ids, maskable, 0.15, mask_id=3, vocab_size=1000, generator=g)
    selected = labels != -100
    assert not selected[:, :10].any()
    assert abs(selected[:, 10:].float().mean().item() - 0.15) < 0.01
    assert torch.equal(labels[selected], ids[selected])
    masked = (inputs == 3) & selected
    unchanged = (inputs == ids) & selected
    n = selected.sum().item()
    assert abs(masked.sum().item() / n - 0.8) < 0.02
    assert abs((n - masked.sum().item() - unchanged.sum().item()) / n - 0.1) < 0.02  # random replacements
    assert torch.equal(inputs[~selected], ids[~selected])


def test_batches_are_reproducible_by_position() -> None:
    data = setup_data(TINY_BERT)
    a = list(data.train_batches(8, epoch=1))
    b = list(data.train_batches(8, epoch=1, start=3))
    for x, y in zip(a[3:], b):
        assert all(torch.equal(x[k], y[k]) for k in x)
    other = next(data.train_batches(8, epoch=2))
    assert not torch.equal(a[0]["input_ids"], other["input_ids"])
