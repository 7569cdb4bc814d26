"""Tokenizers: a pretrained one by name, or one trained on the training split and cached by fingerprint."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from llmtrain.errors import CACHE_ADVICE, ConfigError, writing

log = logging.getLogger(__name__)

# BERT-family models get WordPiece, GPT-family byte-level BPE, as their original tokenizers.
WORDPIECE_MODELS = {"bert", "distilbert", "roberta", "albert", "electra", "deberta", "deberta-v2"}
TOKENIZER_VERSION = 1


def algorithm_for(model_type: str) -> str:
    return "wordpiece" if model_type in WORDPIECE_MODELS else "bpe"


def load_pretrained_tokenizer(name: str, key: str) -> PreTrainedTokenizerBase:
    """AutoTokenizer from a local directory or Hub id, with a clear error when it cannot be found."""
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        hint = "no such directory" if not os.path.exists(name) else str(e).splitlines()[0]
        raise ConfigError(f"{key}={name}: cannot load a tokenizer ({hint}); name a local model directory "
                          "or a Hub id reachable from this machine") from None


def _wordpiece(vocab_size: int, min_frequency: int) -> tuple[Tokenizer, trainers.Trainer]:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special)
    return tok, trainer


def _bpe(vocab_size: int, min_frequency: int) -> tuple[Tokenizer, trainers.Trainer]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    return tok, trainer


def train_tokenizer(texts: Iterator[str], algorithm: str, vocab_size: int, min_frequency: int) -> PreTrainedTokenizerFast:
    """Train a WordPiece or byte-level BPE tokenizer with the `tokenizers` library and wrap it for transformers."""
    if algorithm == "wordpiece":
        tok, trainer = _wordpiece(vocab_size, min_frequency)
        tok.train_from_iterator(texts, trainer)
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]")
    tok, trainer = _bpe(vocab_size, min_frequency)
    tok.train_from_iterator(texts, trainer)
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos, pad_token=eos)


def cached_tokenizer(texts: list[str], corpus_fingerprint: str, model_type: str, vocab_size: int, min_frequency: int,
                     cache_dir: Path) -> tuple[PreTrainedTokenizerFast, bool]:
    """Reuse the tokenizer trained on this corpus with these settings, or train and cache it. Returns (tokenizer, reused)."""
    algorithm = algorithm_for(model_type)
    key = hashlib.sha256(f"{TOKENIZER_VERSION}|{corpus_fingerprint}|{algorithm}|{vocab_size}|{min_frequency}".encode())
    path = cache_dir / "tokenizers" / f"{algorithm}-{vocab_size}-{key.hexdigest()[:16]}"
    if (path / "tokenizer.json").exists():
        log.info("tokenizer: reusing %s", path)
        return AutoTokenizer.from_pretrained(path), True
    log.info("tokenizer: training %s (vocab %d) on %d documents", algorithm, vocab_size, len(texts))
    tokenizer = train_tokenizer(iter(texts), algorithm, vocab_size, min_frequency)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with writing("the tokenizer", path, CACHE_ADVICE, partial=tmp):
        tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer, False


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A content hash of a fast tokenizer, for keying the tokenized-data cache."""
    state = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(state.encode()).hexdigest()[:16]
