"""python -m llmtrain.generate: seeded sampling from a causal LM, fill-mask for a masked LM, clear argument errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DistilBertConfig, DistilBertForMaskedLM, GPT2Config, GPT2LMHeadModel

from conftest import run_cli
from llmtrain import generate
from llmtrain.data.tokenization import train_tokenizer

TEXTS = ["once upon a time there was a little fox who lived in the forest",
         "the cat sat on the mat and the dog ran in the park"] * 20


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory whose model/ is a tiny GPT-2 with a byte-level BPE tokenizer (weights seeded, untrained)."""
    root = tmp_path_factory.mktemp("gen") / "run"
    tok = train_tokenizer(iter(TEXTS), "bpe", 300, 1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=32, n_head=2, n_positions=64,
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gen") / "mlm"
    tok = train_tokenizer(iter(TEXTS), "wordpiece", 300, 1)
    model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=len(tok), n_layers=2, dim=32, n_heads=2, hidden_dim=64,
                                                   max_position_embeddings=64))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def settings(**overrides) -> dict:
    _, s = generate.parse_args(["model", *(f"{k}={v}" for k, v in overrides.items())])
    return s


def test_sampling_is_reproducible_with_a_seed(run_dir: Path) -> None:
    model, tok = generate.load(str(run_dir / "model"), "generate", "cpu")
    s = settings(max_new_tokens=12, temperature=0.9, num_return_sequences=3, seed=7)
    first, again = generate.sample(model, tok, "once upon", s), generate.sample(model, tok, "once upon", s)
    assert torch.equal(first, again)
    assert not torch.equal(first, generate.sample(model, tok, "once upon", {**s, "seed": 8}))
    assert len({tuple(seq.tolist()) for seq in first}) > 1  # the sequences of one call differ from each other


@pytest.mark.parametrize("n", [1, 9])
def test_respects_max_new_tokens(run_dir: Path, n: int) -> None:
    """Never more than max_new_tokens new tokens; fewer only when the model ended the text (EOS)."""
    model, tok = generate.load(str(run_dir), "generate", "cpu")  # a run directory resolves to its model/
    prompt_len = len(tok("the cat sat")["input_ids"])
    out = generate.sample(model, tok, "the cat sat", settings(max_new_tokens=n, num_return_sequences=4))
    assert out.shape[1] - prompt_len <= n
    for seq in out:
        new = seq[prompt_len:]
        stopped = (new == tok.eos_token_id).nonzero()
        if len(stopped):  # ended early: only padding follows the EOS (GPT-2 pads with EOS)
            assert torch.all(new[stopped[0, 0]:] == tok.eos_token_id)
        else:
            assert len(new) == n


def test_cli_prints_each_sequence_reproducibly(run_dir: Path, tmp_path: Path) -> None:
    """The command the README shows; its output equals the in-process result for the same seed."""
    args = ["prompt=Once upon a time", "max_new_tokens=8", "temperature=0.7", "num_return_sequences=2"]
    r = run_cli([str(run_dir / "model"), *args], cwd=tmp_path, module="llmtrain.generate", timeout=300)
    assert r.returncode == 0, r.stderr
    model, tok = generate.load(str(run_dir / "model"), "generate", "cpu")
    texts = generate.generate_texts(model, tok, "Once upon a time", settings(**{a.split("=")[0]: a.split("=", 1)[1]
                                                                               for a in args}))
    expected = "".join(f"=== prompt 1, sequence {j} ===\n{t}\n" for j, t in enumerate(texts, 1))
    # an untrained model emits any byte, "\r" included, which the text-mode pipe reads as a newline
    assert r.stdout == expected.replace("\r\n", "\n").replace("\r", "\n")
    assert all(t.startswith("Once upon a time") for t in texts)


def test_prompt_file_gives_one_block_per_prompt(run_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\n\nonce upon a time\n")
    assert generate.main([str(run_dir / "model"), f"prompt_file={prompts}", "max_new_tokens=3", "temperature=0"]) == 0
    out = capsys.readouterr().out
    assert "=== prompt 1, sequence 1 ===\nthe cat" in out and "=== prompt 2, sequence 1 ===\nonce upon a time" in out
    assert "prompt 3" not in out


def test_bad_arguments_are_all_named_at_once(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    code = generate.main([str(run_dir / "model"), "temprature=0.7", "top_p=1.5", "max_new_tokens=0", "top_k=many",
                          "num_return_sequences=2", "temperature=0"])
    err = capsys.readouterr().err
    assert code == 2
    for needle in ("temprature is not a setting; did you mean temperature?", "top_p=1.5: use a probability in (0, 1]",
                   "max_new_tokens=0: use 1 or more", "top_k=many: expected an integer",
                   "num_return_sequences=2 with temperature=0 (greedy)", "usage: python -m llmtrain.generate"):
        assert needle in err
    assert "Traceback" not in err


def test_missing_model_dir_and_too_long_a_request(run_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    assert generate.main([str(tmp_path / "nowhere"), "prompt=hi"]) == 2
    assert "not a model directory (no such directory)" in capsys.readouterr().err
    assert generate.main([str(run_dir / "model"), "prompt=hi", "max_new_tokens=100"]) == 2
    assert "more than the model's 64 positions: lower max_new_tokens" in capsys.readouterr().err


def test_masked_lm_is_refused_for_generation_and_fills_masks(mlm_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert generate.main([str(mlm_dir), "prompt=the cat sat"]) == 2
    err = capsys.readouterr().err
    assert "holds DistilBertForMaskedLM: a masked LM cannot generate text" in err and "mode=fill-mask" in err

    assert generate.main([str(mlm_dir), "mode=fill-mask", "prompt=the [MASK] sat on the [MASK]",
                          "num_predictions=4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "the [MASK] sat on the [MASK]"
    assert [line.split(":")[0] for line in lines[1:]] == ["  [MASK] 1", "  [MASK] 2"]
    assert all(len(line.split(": ", 1)[1].split(" | ")) == 4 for line in lines[1:])

    model, tok = generate.load(str(mlm_dir), "fill-mask", "cpu")
    (fills,) = generate.fill_mask(model, tok, "the cat [MASK] on the mat", 3)
    scores = [f.score for f in fills]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1
    assert generate.main([str(mlm_dir), "mode=fill-mask", "prompt=no mask here"]) == 2
    assert "has no [MASK]" in capsys.readouterr().err
