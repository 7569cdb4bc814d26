"""The data group: raw text -> tokenizer -> packed blocks (cached with `datasets`) -> batches.

Language-model data is tokenized once, concatenated with a separator between documents and cut
into blocks of `max_length` tokens (no padding but in the last block). Batches are slices of that
tensor; masking for masked LM draws from a generator seeded by (seed, epoch, batch), so a resumed
run sees exactly the batches and masks it would have seen without the interruption.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import torch

from llmtrain.runtime import distributed
from llmtrain.data import sources
from llmtrain.errors import CACHE_ADVICE, ConfigError, DataError, writing
from llmtrain.data.tokenization import cached_tokenizer, load_pretrained_tokenizer, tokenizer_fingerprint

log = logging.getLogger(__name__)

PACK_VERSION = 1
Batch = dict[str, torch.Tensor]


def batch_seed(seed: int, epoch: int, index: int) -> int:
    """A distinct, reproducible generator seed for every (epoch, batch) position."""
    return int.from_bytes(hashlib.blake2b(f"{seed}|{epoch}|{index}".encode(), digest_size=8).digest(), "little") >> 1


def mask_tokens(input_ids: torch.Tensor, maskable: torch.Tensor, probability: float, mask_id: int, vocab_size: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's 80/10/10 masking: returns (inputs, labels) with labels -100 where nothing is predicted.

    Written here rather than taken from DataCollatorForLanguageModeling so that the generator is
    seeded per batch position, which is what makes resumed runs exact.
    """
    probs = torch.full(input_ids.shape, probability)
    probs.masked_fill_(~maskable, 0.0)
    selected = torch.bernoulli(probs, generator=generator).bool()
    labels = torch.where(selected, input_ids, -100)
    inputs = input_ids.clone()
    to_mask = torch.bernoulli(torch.full(input_ids.shape, 0.8), generator=generator).bool() & selected
    inputs[to_mask] = mask_id
    to_random = torch.bernoulli(torch.full(input_ids.shape, 0.5), generator=generator).bool() & selected & ~to_mask
    inputs[to_random] = torch.randint(vocab_size, input_ids.shape, generator=generator)[to_random]
    return inputs, labels


def label_names(labels: list) -> list[str]:
    """The distinct labels as strings, in class-id order: integers numerically first, then names alphabetically."""
    def key(name: str) -> tuple:
        numeric = name.lstrip("-").isdigit()
        return (not numeric, int(name) if numeric else 0, name)
    return sorted({str(x) for x in labels}, key=key)


class DataModule:
    """Everything between the raw corpus and the batches the Trainer consumes."""

    def __init__(self, source: str, path: str | None, train_words: int, validation_words: int, corpus_seed: int,
                 text_column: str, label_column: str, validation_split: float | None, max_length: int,
                 mlm_probability: float, encodings: list[str], tokenizer: dict, cache_dir: str, task: str,
                 model_type: str, pretrained: str | None, seed: int):
        self.source, self.path, self.task, self.model_type = source, path, task, model_type
        self.train_words, self.validation_words, self.corpus_seed = train_words, validation_words, corpus_seed
        self.text_column, self.label_column, self.validation_split = text_column, label_column, validation_split
        self.max_length, self.mlm_probability, self.encodings = max_length, mlm_probability, list(encodings)
        self.tokenizer_name, self.vocab_size = tokenizer.get("name"), tokenizer.get("vocab_size")
        self.min_frequency, self.pretrained = tokenizer.get("min_frequency", 2), pretrained
        self.cache_dir, self.seed = Path(os.path.expanduser(cache_dir)), seed
        self.tokenizer = None
        self.info: dict = {}
        self.id2label: dict[int, str] | None = None
        self.reused: dict[str, bool] = {}

    # ---- set-up -------------------------------------------------------------------------------
    def setup(self) -> None:
        """Load the corpus, get a tokenizer, tokenize and pack (or reuse all of it from the cache)."""
        raw = self._load_raw()
        if not raw.train or sum(len(d) for d in raw.train) == 0:
            raise DataError(f"data.path={self.path}: the corpus has no text")
        self.info.update(raw.info)
        if self.tokenizer_name or self.pretrained:
            key = "data.tokenizer.name" if self.tokenizer_name else "model.pretrained"
            self.tokenizer = load_pretrained_tokenizer(self.tokenizer_name or self.pretrained, key)
            self.reused["tokenizer"] = True
        else:
            self.tokenizer, self.reused["tokenizer"] = cached_tokenizer(
                raw.train, raw.fingerprint, self.model_type, self.vocab_size, self.min_frequency, self.cache_dir)
            if self.vocab_size and len(self.tokenizer) < self.vocab_size / 2 and distributed.rank() == 0:
                log.warning("tokenizer: the vocabulary came out at %d tokens, under half the data.tokenizer."
                            "vocab_size=%d asked: the corpus is too small for that vocabulary (a token must occur "
                            "data.tokenizer.min_frequency=%d times); add text, or set data.tokenizer.vocab_size=%d",
                            len(self.tokenizer), self.vocab_size, self.min_frequency, len(self.tokenizer))
        if self.task == "mlm" and self.tokenizer.mask_token_id is None:
            raise ConfigError(f"the tokenizer {self.tokenizer_name or self.pretrained} has no mask token: "
                              "masked LM needs one (use a BERT-family tokenizer)")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.sep_token
        key = hashlib.sha256(f"{PACK_VERSION}|{raw.fingerprint}|{tokenizer_fingerprint(self.tokenizer)}|{self.task}|"
                             f"{self.max_length}".encode()).hexdigest()[:16]
        path = self.cache_dir / "tokenized" / f"{self.task}-{self.max_length}-{key}"
        self.reused["tokenized"] = (path / "done").exists()
        if not self.reused["tokenized"]:
            self._build(raw, path)
        else:
            log.info("tokenized data: reusing %s", path)
        self._load(path)

    def _load_raw(self) -> sources.RawCorpus:
        if self.task == "cls" and self.source != "json":
            raise ConfigError(f"a classifier (model.task=cls) needs labeled records, and data={self.source} has no "
                              "labels: use data=json data.path=<.jsonl/.json/.csv with text and label fields>")
        if self.source == "builtin":
            return sources.load_builtin(self.train_words, self.validation_words, self.corpus_seed, self.cache_dir)
        if self.source == "wikitext2":
            return sources.load_wikitext2(self.path, self.encodings, self.cache_dir)
        if self.source == "text":
            return sources.load_text(self.path, self.encodings, self.validation_split, self.seed)
        if self.source == "json":
            return sources.load_records(self.path, self.encodings, self.text_column, self.label_column,
                                        self.task == "cls", self.validation_split, self.seed)
        raise ConfigError(f"data.source={self.source!r}: use builtin, wikitext2, text or json")

    def _tokenize(self, docs: list[str], add_special_tokens: bool) -> datasets.Dataset:
        tok = self.tokenizer
        ds = datasets.Dataset.from_dict({"text": docs})
        return ds.map(lambda b: {"input_ids": tok(b["text"], add_special_tokens=add_special_tokens,
                                                  truncation=add_special_tokens, max_length=self.max_length)["input_ids"]},
                      batched=True, batch_size=2000, remove_columns=["text"], desc="tokenizing")

    def _pack(self, docs: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
        """Concatenate documents (separator after each) and cut into max_length blocks; the last may be short."""
        ids = self._tokenize(docs, add_special_tokens=False)
        sep = self.tokenizer.sep_token_id if self.tokenizer.sep_token_id is not None else self.tokenizer.eos_token_id
        column = ids.data.column("input_ids")
        lengths = np.concatenate([c.value_lengths().to_numpy(zero_copy_only=False) for c in column.chunks])
        flat_docs = np.concatenate([c.flatten().to_numpy() for c in column.chunks]).astype(np.int64)
        # insert a separator after every document
        ends = np.cumsum(lengths)
        flat = np.insert(flat_docs, ends, sep) if sep is not None else flat_docs
        n_tokens = len(flat)
        L = self.max_length
        n_blocks = -(-n_tokens // L)
        blocks = np.full((n_blocks, L), self.tokenizer.pad_token_id, dtype=np.int64)
        blocks.reshape(-1)[:n_tokens] = flat
        block_lengths = np.full(n_blocks, L, dtype=np.int64)
        block_lengths[-1] = n_tokens - (n_blocks - 1) * L
        return blocks, block_lengths, n_tokens

    def _build(self, raw: sources.RawCorpus, path: Path) -> None:
        """Tokenize and pack into a private temporary directory, renamed into the cache when complete."""
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        with writing("the tokenized data", path, CACHE_ADVICE, partial=tmp):
            self._write(raw, tmp)
        os.replace(tmp, path) if not path.exists() else shutil.rmtree(tmp, ignore_errors=True)

    def _write(self, raw: sources.RawCorpus, tmp: Path) -> None:
        if self.task == "cls":
            labels = label_names(raw.train_labels + raw.validation_labels)
            index = {name: i for i, name in enumerate(labels)}
            for split, docs, labs in (("train", raw.train, raw.train_labels),
                                      ("validation", raw.validation, raw.validation_labels)):
                ds = self._tokenize(docs, add_special_tokens=True).add_column("label", [index[str(x)] for x in labs])
                ds.save_to_disk(str(tmp / split))
            (tmp / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
        else:
            for split, docs in (("train", raw.train), ("validation", raw.validation)):
                blocks, lengths, n_tokens = self._pack(docs)
                datasets.Dataset.from_dict({"input_ids": blocks, "length": lengths}).save_to_disk(str(tmp / split))
        words = {"validation_words": sum(len(d.split()) for d in raw.validation)}
        (tmp / "words.txt").write_text(str(words["validation_words"]))
        (tmp / "done").touch()

    def _load(self, path: Path) -> None:
        self.splits: dict[str, datasets.Dataset] = {}
        for split in ("train", "validation"):
            self.splits[split] = datasets.load_from_disk(str(path / split))
        self.info["validation_words"] = int((path / "words.txt").read_text())
        if self.task == "cls":
            names = (path / "labels.txt").read_text(encoding="utf-8").splitlines()
            self.id2label = dict(enumerate(names))
            # Python lists of tensors: per-example access to an Arrow column is slow in the batch loop
            self.tensors = {s: ([torch.tensor(x) for x in d["input_ids"]], torch.tensor(d["label"]))
                            for s, d in self.splits.items()}
            self._report_classes(names, Counter(int(x) for x in self.splits["train"]["label"]))
        else:
            # one slice of the whole table: a column read row by row takes seconds on WikiText-2, this milliseconds
            columns = {s: d.with_format("numpy")[:] for s, d in self.splits.items()}
            self.tensors = {s: (torch.tensor(np.asarray(c["input_ids"]), dtype=torch.long),
                                torch.tensor(np.asarray(c["length"]), dtype=torch.long)) for s, c in columns.items()}
            self.info["validation_tokens"] = int(self.tensors["validation"][1].sum())
        n_train = len(self.splits["train"])
        log.info("data: %d train and %d validation %s of up to %d tokens", n_train, len(self.splits["validation"]),
                 "examples" if self.task == "cls" else "blocks", self.max_length)
        if n_train == 0 or len(self.splits["validation"]) == 0:
            raise DataError(f"data.path={self.path}: too little text for a training and a validation split")

    @staticmethod
    def _report_classes(names: list[str], counts: Counter) -> None:
        """Log the class balance of the training split; warn when one class dwarfs another (or one is absent)."""
        total = sum(counts.values())
        log.info("classes (train): %s", ", ".join(f"{name}={counts.get(i, 0)} ({100 * counts.get(i, 0) / total:.0f}%)"
                                                   for i, name in enumerate(names)))
        unseen = [name for i, name in enumerate(names) if not counts.get(i)]
        if unseen:
            log.warning("labels only in the validation split, never trained on: %s", ", ".join(unseen))
        seen = [counts[i] for i in range(len(names)) if counts.get(i)]
        if max(seen) > 3 * min(seen):
            log.warning("class imbalance: the largest class has %.1fx the examples of the smallest; accuracy alone "
                        "flatters a classifier that predicts the majority class, so watch eval/macro_f1",
                        max(seen) / min(seen))

    # ---- batches ------------------------------------------------------------------------------
    def num_batches(self, split: str, batch_size: int, world_size: int = 1) -> int:
        n = len(self.splits[split])
        per_rank = -(-n // world_size) if split == "train" else n
        return -(-per_rank // batch_size)

    def train_batches(self, batch_size: int, epoch: int, start: int = 0, rank: int = 0,
                      world_size: int = 1) -> Iterator[Batch]:
        """Batches of epoch `epoch` in a seeded order, from batch index `start`, this rank's shard only."""
        n = len(self.splits["train"])
        order = torch.randperm(n, generator=torch.Generator().manual_seed(batch_seed(self.seed, epoch, -1)))
        if world_size > 1:  # pad so every rank gets the same number of batches
            order = torch.cat([order, order[: (-n) % world_size]])[rank::world_size]
        if self.task == "cls":
            order = self._bucket(order, batch_size, batch_seed(self.seed, epoch, -2))
        for i in range(start, self.num_batches("train", batch_size, world_size)):
            idx = order[i * batch_size:(i + 1) * batch_size]
            yield self._batch("train", idx, batch_seed(self.seed, epoch, i * world_size + rank))

    def eval_batches(self, batch_size: int, max_batches: int | None = None, rank: int = 0,
                     world_size: int = 1) -> Iterator[Batch]:
        """Validation batches in a fixed order with fixed masks, so every evaluation scores the same targets."""
        n = len(self.splits["validation"])
        order = torch.arange(n)
        if self.task == "cls":  # sorted by length: least padding
            lengths = [len(x) for x in self.tensors["validation"][0]]
            order = torch.tensor(sorted(range(n), key=lengths.__getitem__), dtype=torch.long)
        total = self.num_batches("validation", batch_size)
        if max_batches:
            total = min(total, max_batches)
        for i in range(rank, total, world_size):
            yield self._batch("validation", order[i * batch_size:(i + 1) * batch_size], batch_seed(self.seed, -1, i))

    def _bucket(self, order: torch.Tensor, batch_size: int, seed: int) -> torch.Tensor:
        """Sort by length inside windows of 50 batches, then shuffle the batches: little padding, order still random.

        As transformers' LengthGroupedSampler does; the batch shuffle keeps a window from running short to long.
        """
        lengths = [len(self.tensors["train"][0][i]) for i in order.tolist()]
        window = 50 * batch_size
        batches: list[list[int]] = []
        for s in range(0, len(order), window):
            chunk = sorted(range(s, min(s + window, len(order))), key=lambda j: lengths[j])
            batches.extend(chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size))
        # the last batch may be short: keep it last so every other batch is full
        head = torch.randperm(len(batches) - 1, generator=torch.Generator().manual_seed(seed)).tolist()
        return order[torch.tensor([j for b in head + [len(batches) - 1] for j in batches[b]], dtype=torch.long)]

    def _batch(self, split: str, idx: torch.Tensor, seed: int) -> Batch:
        if self.task == "cls":
            ids, labels = self.tensors[split]
            rows = [ids[i] for i in idx.tolist()]
            width = max(len(r) for r in rows)  # dynamic padding: to the longest example of this batch
            input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                input_ids[j, :len(r)] = r
                attention[j, :len(r)] = 1
            return {"input_ids": input_ids, "attention_mask": attention, "labels": labels[idx]}
        blocks, lengths = self.tensors[split]
        input_ids, lens = blocks[idx], lengths[idx]
        attention = (torch.arange(input_ids.shape[1]) < lens[:, None]).long()
        if self.task == "clm":
            labels = input_ids.masked_fill(attention == 0, -100)
        else:
            special = torch.tensor(self.tokenizer.all_special_ids)
            maskable = (attention == 1) & ~torch.isin(input_ids, special)
            input_ids, labels = mask_tokens(input_ids, maskable, self.mlm_probability, self.tokenizer.mask_token_id,
                                            len(self.tokenizer), torch.Generator().manual_seed(seed))
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
