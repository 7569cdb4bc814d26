"""Raw text sources (builtin, wikitext2, text, json): validated, decoded, split, fingerprinted."""
from __future__ import annotations

import codecs
import csv
import glob
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from llmtrain.errors import CACHE_ADVICE, DataError, writing

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".text", ".raw", ".tokens", ".md")
RECORD_SUFFIXES = (".json", ".jsonl", ".csv")


@dataclass
class RawCorpus:
    """Documents per split (and labels for classification), plus a fingerprint of where they came from."""

    train: list[str]
    validation: list[str]
    fingerprint: str
    train_labels: list | None = None
    validation_labels: list | None = None
    info: dict = field(default_factory=dict)


def decode(path: Path, encodings: list[str]) -> str:
    """Decode a file with the first of `encodings` that works, logging which one was used."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(f"{path}: UTF-16 text; convert it to UTF-8 (e.g. iconv -f utf-16 -t utf-8)")
    if b"\x00" in data[:8192]:
        raise DataError(f"{path}: looks like a binary file, not text (data.path should name text files)")
    for enc in encodings:
        try:
            text = data.decode(enc)
        except (UnicodeDecodeError, LookupError):
            continue
        sample = text[:8192]
        controls = sum((ch < " " and ch not in "\t\n\r\f\v") or "\x7f" <= ch <= "\x9f" for ch in sample)
        if controls > 0.1 * max(1, len(sample)):
            raise DataError(f"{path}: looks like a binary file, not text (data.path should name text files)")
        (log.info if enc != encodings[0] else log.debug)("%s: decoded as %s", path, enc)
        return text
    raise DataError(f"{path}: none of data.encodings={list(encodings)} decodes it; "
                    "add the file's encoding to data.encodings")


def file_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.resolve()).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def resolve_files(path: str | None, suffixes: tuple[str, ...], key: str = "data.path") -> list[Path]:
    """Expand a file, directory or glob into a sorted list of files, or say precisely what is wrong."""
    if path is None or str(path).strip() == "":
        raise DataError(f"{key} is not set: give a file, a directory or a glob, e.g. {key}=corpus.txt")
    p = Path(os.path.expanduser(str(path)))
    if any(ch in str(path) for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(str(path)), recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"{key}={path}: the glob matches no files")
        return files
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
        if not files:
            raise DataError(f"{key}={path}: the directory has no {'/'.join(suffixes)} files")
        return files
    if p.is_file():
        return [p]
    raise DataError(f"{key}={path}: no such file or directory")


def split_validation(docs: list[str], labels: list | None, fraction: float | None, seed: int, key: str,
                     where: str, more: str):
    """Hold out a seeded fraction of the documents for validation; `where` and `more` (how to add data) for messages."""
    if not fraction:
        raise DataError(f"no validation data: set {key} (e.g. 0.05) or provide a validation file")
    if not 0 < fraction < 1:
        raise DataError(f"{key}={fraction}: use a fraction between 0 and 1")
    if len(docs) < 2:  # validating on the one training document would score memorization, not learning
        raise DataError(f"{where}: 1 document is too few to hold out a validation split from (a run would "
                        f"validate on its own training text); {more}")
    import random

    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(docs) * fraction)))
    if n_val >= len(docs):
        raise DataError(f"{where}: {key}={fraction} of {len(docs)} documents leaves none for training; "
                        f"lower {key}, or {more}")
    val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
    pick = lambda xs, idx: [xs[i] for i in idx] if xs is not None else None  # noqa: E731
    return pick(docs, train_idx), pick(docs, val_idx), pick(labels, train_idx), pick(labels, val_idx)


def check_distinct(train: list[str], validation: list[str], where: str) -> None:
    """Refuse a validation split made only of copies of training documents: it would score memorization."""
    seen = set(train)
    if all(doc in seen for doc in validation):
        distinct = f"{len(seen)} distinct document{'s' * (len(seen) != 1)}"
        raise DataError(f"{where}: every validation document also occurs in the training split (it has only "
                        f"{distinct}), so validation would score memorization, not learning; add distinct documents")


def lines_of(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_builtin(train_words: int, validation_words: int, corpus_seed: int, cache_dir: Path) -> RawCorpus:
    """The generated story corpus, cached as text files so a second run skips generation."""
    from llmtrain.data import corpus as corpus_mod

    key = f"builtin-v{getattr(corpus_mod, 'VERSION', 1)}-s{corpus_seed}-{train_words}-{validation_words}"
    root = cache_dir / "corpus" / key
    meta_path = root / "meta.json"
    if not meta_path.exists():
        c = corpus_mod.generate_corpus(seed=corpus_seed, train_words=train_words, validation_words=validation_words)
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        meta = {"validation_nll_per_word": c.validation_nll_per_word, "train_nll_per_word": c.train_nll_per_word,
                "validation_words": sum(len(d.split()) for d in c.validation),
                "unigram_nll_per_word": corpus_mod.unigram_nll_per_word(c.train, c.validation)}
        with writing("the generated corpus", root, CACHE_ADVICE, partial=tmp):
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / "train.txt").write_text("\n".join(c.train) + "\n", encoding="utf-8")
            (tmp / "validation.txt").write_text("\n".join(c.validation) + "\n", encoding="utf-8")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads(meta_path.read_text())
    train = lines_of((root / "train.txt").read_text(encoding="utf-8"))
    validation = lines_of((root / "validation.txt").read_text(encoding="utf-8"))
    return RawCorpus(train, validation, fingerprint=key, info=meta)


def load_text(path: str, encodings: list[str], validation_split: float | None, seed: int) -> RawCorpus:
    """Text files (one document per non-empty line); validation held out by data.validation_split."""
    files = resolve_files(path, TEXT_SUFFIXES)
    docs: list[str] = []
    for f in files:
        lines = lines_of(decode(f, encodings))
        if not lines:
            raise DataError(f"{f}: the file is empty (no non-blank lines)")
        docs.extend(lines)
    where = str(files[0]) if len(files) == 1 else f"data.path={path}"
    train, val, _, _ = split_validation(docs, None, validation_split, seed, "data.validation_split", where,
                                        "add documents (one per non-blank line)")
    check_distinct(train, val, where)
    return RawCorpus(train, val, fingerprint=f"text-{file_digest(files)}-{validation_split}-{seed}",
                     info={"files": [str(f) for f in files]})


def load_wikitext2(path: str | None, encodings: list[str], cache_dir: Path) -> RawCorpus:
    """WikiText-2 from a local copy (raw files preferred, else the tokenized ones) or the Hub."""
    if path is None:
        import datasets

        try:
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", cache_dir=str(cache_dir / "hf"))
        except Exception as e:  # noqa: BLE001 - any Hub failure gets the same advice
            raise DataError(f"data=wikitext2 could not load wikitext/wikitext-2-raw-v1 from the Hub ({type(e).__name__}); "
                            "offline, point data.path at a directory with wiki.{train,valid,test}.raw or .tokens") from None
        train = [t.strip() for t in ds["train"]["text"] if t.strip()]
        val = [t.strip() for t in ds["validation"]["text"] if t.strip()]
        return RawCorpus(train, val, fingerprint="wikitext-2-raw-v1-hub", info={"variant": "hub raw"})
    root = Path(os.path.expanduser(str(path)))
    if not root.is_dir():
        raise DataError(f"data.path={path}: not a directory (data=wikitext2 wants the folder holding wiki.train.raw)")
    for variant in ("raw", "tokens"):
        train_f, val_f = root / f"wiki.train.{variant}", root / f"wiki.valid.{variant}"
        if train_f.is_file() and val_f.is_file():
            log.info("wikitext2: using the %s files in %s", variant, root)
            train, val = lines_of(decode(train_f, encodings)), lines_of(decode(val_f, encodings))
            if not train:
                raise DataError(f"{train_f}: the file is empty")
            return RawCorpus(train, val, fingerprint=f"wikitext2-{variant}-{file_digest([train_f, val_f])}",
                             info={"variant": variant, "files": [str(train_f), str(val_f)]})
    raise DataError(f"data.path={path}: found neither wiki.train.raw + wiki.valid.raw nor wiki.train.tokens + wiki.valid.tokens")


def read_records(path: Path, encodings: list[str]) -> list[tuple[str, dict]]:
    """(where, record) pairs from .jsonl (one object per line), .json (a list of objects) or .csv (a header row).

    `where` names the file and, but for a .json list, the line: for error messages.
    """
    text = decode(path, encodings)
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    if path.suffix.lower() == ".csv":
        return read_csv(path, text)
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith(("[", "{")):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            if stripped.startswith("["):
                raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
            records = None  # perhaps JSON Lines in a .json file
        if isinstance(records, dict):  # a single record
            records = [records]
        if records is not None:
            for i, rec in enumerate(records, 1):
                if not isinstance(rec, dict):
                    raise DataError(f"{path}: record {i} is a {type(rec).__name__}, expected an object")
            return [(str(path), rec) for rec in records]
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        records.append((f"{path}:{lineno}", rec))
    return records


def read_csv(path: Path, text: str) -> list[tuple[str, dict]]:
    """(file:line, record) pairs of a CSV file with a header row; a row with more or fewer fields is refused.

    csv.DictReader would file a row's extra fields under None and fill missing ones with None: an unquoted
    comma in a text would cut the text short and shift the rest into the label.
    """
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)  # newline="": line breaks inside quotes
    records, start = [], 1
    try:
        header = next((row for row in reader if any(field.strip() for field in row)), None)
        if header is None:
            raise DataError(f"{path}: no header row (the first line should name the columns, e.g. text,label)")
        if len(set(header)) < len(header):
            twice = sorted({h for h in header if header.count(h) > 1})
            raise DataError(f"{path}:{reader.line_num}: the header names {', '.join(map(repr, twice))} more than "
                            "once; give every column its own name")
        start = reader.line_num + 1
        for row in reader:
            where, start = f"{path}:{start}", reader.line_num + 1  # a quoted field may span lines: where it began
            if not any(field.strip() for field in row):
                continue  # a blank line
            if len(row) != len(header):
                fix = ('quote fields that contain commas ("like, this"), doubling quotes inside them'
                       if len(row) > len(header) else "give every row a value for every column")
                raise DataError(f"{where}: {len(row)} field{'s' * (len(row) != 1)} where the header has "
                                f"{len(header)} ({', '.join(header)}); {fix}")
            records.append((where, dict(zip(header, row))))
    except csv.Error as e:
        raise DataError(f"{path}:{start}: malformed CSV ({e}); quote a field that contains a quote, comma or "
                        'line break, doubling the quotes inside it ("say ""hi"", then")') from None
    return records


def load_records(path: str, encodings: list[str], text_column: str, label_column: str | None, need_labels: bool,
                 validation_split: float | None, seed: int) -> RawCorpus:
    """JSON/JSONL/CSV records with a text field and, for classification, a label field.

    A file named like `*valid*`/`*val*`/`*dev*` beside training files is used as the validation split.
    """
    files = resolve_files(path, RECORD_SUFFIXES)
    splits: dict[str, tuple[list[str], list]] = {"train": ([], []), "validation": ([], [])}
    named: dict[str, list[Path]] = {"train": [], "validation": []}
    for f in files:
        stem = f.stem.lower()
        split = "validation" if any(t in stem for t in ("valid", "val", "dev", "test")) and len(files) > 1 else "train"
        named[split].append(f)
        for i, (where, rec) in enumerate(read_records(f, encodings), 1):
            fields = f"; its fields: {', '.join(map(repr, rec)) or 'none'}"
            if text_column not in rec:
                raise DataError(f"{where}: record {i} has no text field {text_column!r} (set data.text_column)"
                                + fields)
            if not isinstance(rec[text_column], str):
                raise DataError(f"{where}: record {i}: the text field {text_column!r} is a "
                                f"{type(rec[text_column]).__name__}, not a string")
            if need_labels and (label_column not in rec or rec[label_column] in (None, "")):
                raise DataError(f"{where}: record {i} has no label field {label_column!r} (set data.label_column)"
                                + fields)
            splits[split][0].append(rec[text_column])
            splits[split][1].append(rec.get(label_column) if need_labels else None)
    train_docs, train_labels = splits["train"]
    where = {s: str(fs[0]) if len(fs) == 1 else f"data.path={path}" for s, fs in named.items()}
    if not train_docs:
        raise DataError(f"data.path={path}: no training records")
    if named["validation"]:
        val_docs, val_labels = splits["validation"]
        if not val_docs:
            raise DataError(f"{where['validation']}: the validation file has no records; add records to it, or "
                            "remove it to hold out data.validation_split of the training records")
    else:
        train_docs, val_docs, train_labels, val_labels = split_validation(
            train_docs, train_labels, validation_split, seed, "data.validation_split", where["train"],
            "add records, or point data.path at a directory holding train and valid files")
    if need_labels and len(classes := {str(x) for x in train_labels}) < 2:
        # one class: every prediction is right, and the record would show a "perfect" classifier
        others = sorted({str(x) for x in val_labels} - classes)
        raise DataError(f"{where['train']}: every training record has {label_column}={next(iter(classes))!r}; a "
                        "classifier needs at least two classes" + (f" (the validation split alone has "
                        f"{', '.join(map(repr, others))})" if others else "")
                        + f": check that data.label_column={label_column} names the label field, or add records "
                        "of the other classes")
    check_distinct(train_docs, val_docs, where["validation"] if named["validation"] else where["train"])
    return RawCorpus(train_docs, val_docs, fingerprint=f"records-{file_digest(files)}-{text_column}-{label_column}-"
                     f"{validation_split}-{seed}", train_labels=train_labels if need_labels else None,
                     validation_labels=val_labels if need_labels else None, info={"files": [str(f) for f in files]})
