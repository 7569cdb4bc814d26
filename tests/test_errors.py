"""Bad config and bad input: one short message naming the key or file, a non-zero exit, no traceback, no checkpoint."""
from __future__ import annotations

import codecs
import json
import logging
import random
from pathlib import Path

import pytest

from conftest import TINY, TINY_GPT, build, run_cli, run_main, train_in_process
from llmtrain.data import sources
from llmtrain.errors import DataError

HYDRA = 1  # Hydra's own command-line errors (unknown group option, unknown key without +)
OURS = 2  # ConfigError / DataError / UserError


def make_inputs(root: Path) -> Path:
    """Every kind of bad input file, written once for the whole table."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    files = {
        "empty.txt": b"",
        "blank.txt": b"\n   \n\t\n",
        "binary.txt": bytes(range(256)) * 40,
        "noise.txt": bytes(rng.randrange(1, 256) for _ in range(20000)),  # binary without a NUL byte
        "latin1.txt": "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1") * 50,
        "utf16.txt": codecs.BOM_UTF16_LE + "hello there\n".encode("utf-16-le") * 50,
        "bad.jsonl": b'{"text": "one"}\n{"text": "two"\n{"text": "three"}\n',
        "notext.jsonl": b'{"text": "one"}\n\n{"body": "two"}\n',
        "numtext.jsonl": b'{"text": "one"}\n{"text": 2}\n',
        "nolabel.jsonl": b'{"text": "one", "label": "a"}\n{"text": "two"}\n',
        "strings.json": b'["one", "two"]',
        "notext.csv": b"body,label\none,a\ntwo,b\n",
        "only_csv/data.csv": b"text\none\n",
        # line 7: an unquoted comma (csv.DictReader would cut the text at it and take " world" for the label)
        "comma.csv": b"text,label\n" + b"".join(b'"quoted, fine %d",pos\n' % i for i in range(5))
                     + b"hello, world,neg\n",
        "short_row.csv": b"text,label\n" + b"one,pos\n\n" + b"two\n" + b"three,neg\n",
        "unclosed.csv": b'text,label\none,pos\n"two, neg\nthree,pos\n',
        "dup_header.csv": b"text,text\none,two\n",
        "one_class.jsonl": b"".join(b'{"text": "review %d", "label": "pos"}\n' % i for i in range(20)),
        "one_class_dir/train.jsonl": b"".join(b'{"text": "review %d", "label": "pos"}\n' % i for i in range(20)),
        "one_class_dir/valid.jsonl": b'{"text": "a", "label": "pos"}\n{"text": "b", "label": "neg"}\n',
        "empty_valid/train.jsonl": b"".join(b'{"text": "line %d"}\n' % i for i in range(20)),
        "empty_valid/valid.json": b"[]",
        "one_line.txt": b"the only document in this corpus, on one line\n",
        "repeated.txt": b"the same line again and again\n" * 40,
        "two_lines.txt": b"a first document\na second document\n",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "empty_dir").mkdir(exist_ok=True)
    return root


# (id, overrides with {d} for the inputs directory, exit code, strings the message must contain)
CASES = [
    # -- config: ranges, types, unknown keys, cross-group limits -------------------------------------------------
    ("batch_size_0", ["trainer.batch_size=0"], OURS, ["trainer.batch_size=0", "1 or more"]),
    ("lr_0", ["optimizer.lr=0"], OURS, ["optimizer.lr=0", "positive"]),
    ("lr_negative", ["optimizer.lr=-1e-3"], OURS, ["optimizer.lr"]),
    ("grad_accum_0", ["trainer.grad_accum_steps=0"], OURS, ["trainer.grad_accum_steps=0"]),
    ("mlm_probability_1.5", ["data.mlm_probability=1.5"], OURS, ["data.mlm_probability=1.5", "between 0 and 1"]),
    ("mlm_probability_0", ["data.mlm_probability=0"], OURS, ["data.mlm_probability=0"]),
    ("max_length_over_positions", ["model=gpt2_tiny", "data.max_length=1024"], OURS,
     ["data.max_length=1024", "256 positions", "model.config.n_positions"]),
    ("eval_every_negative", ["trainer.eval_every=-1"], OURS, ["trainer.eval_every=-1"]),
    ("keep_last_negative", ["trainer.keep_last=-1"], OURS, ["trainer.keep_last=-1"]),
    ("num_threads_0", ["hardware.num_threads=0"], OURS, ["hardware.num_threads=0"]),
    ("vocab_size_tiny", ["data.tokenizer.vocab_size=10"], OURS, ["data.tokenizer.vocab_size=10"]),
    ("batch_size_not_int", ["trainer.batch_size=abc"], OURS, ["trainer.batch_size='abc'", "integer"]),
    ("max_steps_float", ["trainer.max_steps=2.5"], OURS, ["trainer.max_steps=2.5", "integer"]),
    ("bool_not_bool", ["model.trust_remote_code=yes"], OURS, ["model.trust_remote_code='yes'", "true or false"]),
    ("precision_unknown", ["hardware.precision=fp8"], OURS, ["hardware.precision='fp8'", "fp32"]),
    ("device_unknown", ["hardware.device=tpu"], OURS, ["hardware.device='tpu'"]),
    ("device_cuda_without_gpu", ["hardware.device=cuda"], OURS, ["hardware.device=cuda", "no CUDA GPU"]),
    ("scheduler_typo", ["scheduler.name=cosin"], OURS, ["scheduler.name='cosin'", "did you mean cosine"]),
    ("encoding_unknown", ["data.encodings=[utf-8,utf-9]"], OURS, ["data.encodings", "'utf-9'"]),
    ("patience_without_eval", ["trainer.early_stopping.patience=2"], OURS,
     ["trainer.early_stopping.patience=2", "trainer.eval_every"]),
    ("added_key_typo", ["+trainer.batchsize=8"], OURS, ["trainer.batchsize", "did you mean trainer.batch_size"]),
    ("added_nested_typo", ["+trainer.early_stopping.patiense=3"], OURS,
     ["trainer.early_stopping.patiense", "did you mean trainer.early_stopping.patience"]),
    ("hf_field_typo", ["model=gpt2_tiny", "+model.config.n_layr=2"], OURS,
     ["model.config.n_layr", "did you mean model.config.n_layer"]),
    ("resume_missing", ["trainer.resume={d}/no-such-run"], OURS, ["trainer.resume=", "no-such-run"]),
    ("resume_not_a_checkpoint", ["trainer.resume={d}/empty_dir"], OURS, ["trainer.resume=", "empty_dir"]),
    ("pretrained_missing", ["model.pretrained={d}/no-such-model"], OURS, ["model.pretrained=", "no-such-model"]),
    ("many_at_once", ["trainer.batch_size=0", "optimizer.lr=-1", "data.mlm_probability=2", "trainer.progress=maybe"],
     OURS, ["4 problems", "trainer.batch_size=0", "optimizer.lr=-1", "data.mlm_probability=2", "trainer.progress"]),
    ("text_without_path", ["data=text"], OURS, ["data.path", "data.path=corpus.txt"]),
    # -- Hydra's own errors, with our "did you mean" added ----------------------------------------------------------
    ("hydra_key_typo", ["trainer.batchsize=8"], HYDRA, ["trainer.batchsize", "did you mean trainer.batch_size?"]),
    ("hydra_group_typo", ["trainr.max_steps=3"], HYDRA, ["trainr.max_steps", "did you mean trainer.max_steps?"]),
    ("hydra_hf_field_typo", ["model=gpt2_tiny", "model.config.n_layr=2"], HYDRA,
     ["did you mean model.config.n_layer?"]),
    ("hydra_unknown_option", ["model=gpt3"], HYDRA, ["model/gpt3", "gpt2_tiny"]),
    # -- a run that diverges: real non-finite losses from a learning rate far too high ----------------------------
    ("lr_diverges", ["model=gpt2_tiny", "optimizer.lr=1e30", "scheduler.warmup_ratio=0", "trainer.max_bad_steps=2",
                     "trainer.max_steps=10"], OURS, ["trainer.max_bad_steps=2", "optimizer.lr", "trainer.max_grad_norm"]),
    # -- data: missing, empty, not text, wrong encoding, bad records ------------------------------------------------
    ("path_missing", ["data=text", "data.path={d}/missing.txt"], OURS, ["missing.txt", "no such file or directory"]),
    ("file_empty", ["data=text", "data.path={d}/empty.txt"], OURS, ["empty.txt", "empty"]),
    ("file_blank", ["data=text", "data.path={d}/blank.txt"], OURS, ["blank.txt", "empty"]),
    ("dir_empty", ["data=text", "data.path={d}/empty_dir"], OURS, ["empty_dir", "no .txt"]),
    ("dir_no_matching_files", ["data=text", "data.path={d}/only_csv"], OURS, ["only_csv", "no .txt"]),
    ("glob_matches_nothing", ["data=text", "data.path={d}/*.nomatch"], OURS, ["*.nomatch", "matches no files"]),
    ("binary_file", ["data=text", "data.path={d}/binary.txt"], OURS, ["binary.txt", "binary"]),
    ("binary_without_nul", ["data=text", "data.path={d}/noise.txt"], OURS, ["noise.txt", "binary"]),
    ("utf16_file", ["data=text", "data.path={d}/utf16.txt"], OURS, ["utf16.txt", "UTF-16"]),
    ("no_encoding_decodes", ["data=text", "data.path={d}/latin1.txt", "data.encodings=[utf-8]"], OURS,
     ["latin1.txt", "data.encodings"]),
    ("jsonl_invalid_line", ["data=json", "data.path={d}/bad.jsonl"], OURS, ["bad.jsonl:2", "invalid JSON"]),
    ("jsonl_no_text_field", ["data=json", "data.path={d}/notext.jsonl"], OURS,
     ["notext.jsonl:3", "'text'", "data.text_column"]),
    ("jsonl_text_not_string", ["data=json", "data.path={d}/numtext.jsonl"], OURS, ["numtext.jsonl:2", "int"]),
    ("jsonl_no_label_field", ["data=json", "model=distilbert_cls_tiny", "data.path={d}/nolabel.jsonl"], OURS,
     ["nolabel.jsonl:2", "'label'", "data.label_column"]),
    ("json_not_objects", ["data=json", "data.path={d}/strings.json"], OURS, ["strings.json", "record 1 is a str"]),
    ("csv_no_text_column", ["data=json", "data.path={d}/notext.csv"], OURS, ["notext.csv:2", "'text'"]),
    # -- data that would make the record meaningless: malformed CSV rows, one class, no distinct validation -------
    ("csv_unquoted_comma", ["data=json", "data.path={d}/comma.csv"], OURS,
     ["comma.csv:7: 3 fields where the header has 2", "quote fields that contain commas"]),
    ("csv_missing_field", ["data=json", "data.path={d}/short_row.csv"], OURS,
     ["short_row.csv:4: 1 field where the header has 2", "a value for every column"]),
    ("csv_unclosed_quote", ["data=json", "data.path={d}/unclosed.csv"], OURS, ["unclosed.csv:3", "malformed CSV"]),
    ("csv_duplicate_column", ["data=json", "data.path={d}/dup_header.csv"], OURS, ["dup_header.csv:1", "'text'"]),
    ("cls_one_class", ["data=json", "model=distilbert_cls_tiny", "data.path={d}/one_class.jsonl"], OURS,
     ["one_class.jsonl", "label='pos'", "at least two classes", "data.label_column"]),
    ("cls_one_class_in_training", ["data=json", "model=distilbert_cls_tiny", "data.path={d}/one_class_dir"], OURS,
     ["train.jsonl", "label='pos'", "the validation split alone has 'neg'"]),
    ("validation_file_empty", ["data=json", "data.path={d}/empty_valid"], OURS, ["valid.json", "no records"]),
    ("text_one_document", ["data=text", "data.path={d}/one_line.txt"], OURS,
     ["one_line.txt", "1 document is too few", "validate on its own training text"]),
    ("text_one_document_repeated", ["data=text", "data.path={d}/repeated.txt"], OURS,
     ["repeated.txt", "also occurs in the training split", "1 distinct document)", "add distinct documents"]),
    ("validation_split_leaves_nothing", ["data=text", "data.path={d}/two_lines.txt", "data.validation_split=0.9"],
     OURS, ["two_lines.txt", "data.validation_split=0.9 of 2 documents leaves none for training"]),
    ("wikitext_dir_without_files", ["data=wikitext2", "data.path={d}/empty_dir"], OURS, ["empty_dir", "wiki.train"]),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_inputs(tmp_path_factory.mktemp("bad-inputs"))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_config_or_input_fails_cleanly(case, inputs: Path, tmp_path: Path, capfd, monkeypatch) -> None:
    name, overrides, code, needles = case
    run_dir = tmp_path / "run"
    args = [*TINY, "hardware.num_threads=1", *(o.format(d=inputs) for o in overrides)]
    got, output = run_main(args, run_dir, capfd, monkeypatch)
    assert got == code, output
    for needle in needles:
        assert needle.format(d=inputs) in output, (needle, output)
    assert "Traceback" not in output, output
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "model").exists()
    assert len(output.strip().splitlines()) < 25, output  # short: the message, not a dump


def test_the_real_command_line_reports_every_problem_without_a_traceback(tmp_path: Path) -> None:
    r = run_cli([*TINY, "trainer.batch_size=0", "optimizer.lr=-1", "data.max_length=100000",
                 f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == OURS, out
    assert "trainer.batch_size=0" in out and "optimizer.lr=-1" in out and "data.max_length=100000" in out
    assert "Traceback" not in out


@pytest.mark.parametrize("name", ["csv_unquoted_comma", "cls_one_class", "text_one_document"])
def test_the_real_command_line_refuses_input_that_would_make_the_record_meaningless(name: str, inputs: Path,
                                                                                    tmp_path: Path) -> None:
    """As a user runs it, in a subprocess: exit 2, the file (and line) named, no traceback, the run recorded failed."""
    _, overrides, code, needles = next(c for c in CASES if c[0] == name)
    run_dir = tmp_path / "run"
    r = run_cli([*TINY, "hardware.num_threads=1", *(o.format(d=inputs) for o in overrides),
                 f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == code == OURS, out
    assert all(needle in out for needle in needles) and str(inputs) in out, out
    assert "Traceback" not in out, out
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "model").exists()
    assert not (run_dir / "metrics.jsonl").exists()
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "failed"


def test_the_real_command_line_suggests_a_key_for_a_typo(tmp_path: Path) -> None:
    r = run_cli(["trainer.max_step=3", f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert r.returncode == HYDRA
    assert "did you mean trainer.max_steps?" in r.stderr and "Traceback" not in r.stdout + r.stderr


def test_verbose_shows_where_the_error_was_raised(tmp_path: Path, capfd, monkeypatch) -> None:
    (tmp_path / "bad.csv").write_text("text,label\nfine,a\nnot, quoted,b\n")
    code, output = run_main([*TINY, "data=json", f"data.path={tmp_path}/bad.csv", "hydra.verbose=llmtrain"],
                            tmp_path / "run", capfd, monkeypatch)
    assert code == OURS and "bad.csv:3" in output
    assert "Traceback" in output and "read_csv" in output


def test_ctrl_c_before_training_exits_130_quietly(tmp_path: Path, capfd, monkeypatch) -> None:
    from llmtrain.data.module import DataModule

    def interrupted(self) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(DataModule, "setup", interrupted)
    code, output = run_main(TINY_GPT, tmp_path / "run", capfd, monkeypatch)
    assert code == 130 and "interrupted before training started" in output and "Traceback" not in output


# -- encodings: the fallbacks decode, and say which one they used --------------------------------------------------
@pytest.mark.parametrize("encoding,text", [("gbk", "\u4eca\u5929\u5929\u6c14\u5f88\u597d\u3002\u6211\u4eec\u53bb"
                                                   "\u516c\u56ed\u6563\u6b65\u5427\u3002"),
                                           ("latin-1", "caf\u00e9\nna\u00efve fa\u00e7ade\n")])
def test_fallback_encodings_decode_and_are_logged(tmp_path: Path, caplog, encoding: str, text: str) -> None:
    f = tmp_path / "doc.txt"
    lines = [f"{line.strip()} {i}" for i in range(20) for line in text.splitlines() if line.strip()]  # distinct
    f.write_bytes("".join(line + "\n" for line in lines).encode(encoding))
    with caplog.at_level(logging.INFO, logger="llmtrain.data.sources"):
        corpus = sources.load_text(str(f), ["utf-8", "gbk", "latin-1"], 0.1, seed=0)
    assert sorted(corpus.train + corpus.validation) == sorted(lines)
    assert any(f"decoded as {encoding}" in m for m in caplog.messages), caplog.messages


def test_utf8_is_tried_first(tmp_path: Path) -> None:
    f = tmp_path / "doc.txt"
    f.write_text("\u4eca\u5929 caf\u00e9\n" * 20, encoding="utf-8")
    assert sources.decode(f, ["utf-8", "gbk", "latin-1"]).startswith("\u4eca\u5929 caf\u00e9")


def test_a_file_no_encoding_decodes_is_named(tmp_path: Path) -> None:
    f = tmp_path / "doc.txt"
    f.write_bytes("\u4eca\u5929\n".encode("gbk"))
    with pytest.raises(DataError, match=r"doc\.txt: none of data.encodings=\['utf-8'\]"):
        sources.decode(f, ["utf-8"])


# -- warnings: input or settings that make a run less than it looks; it goes on, and says so once -------------------
WARMUP, VOCAB = "is still warming up when training ends", "the corpus is too small for that vocabulary"


@pytest.mark.parametrize("model", ["gpt2_tiny", "distilbert_tiny"])  # byte-level BPE and WordPiece
def test_a_tiny_normal_run_warns_of_neither(model: str, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):  # both checks run while the run is set up: data, then the schedule
        assert build([*TINY, f"model={model}"], tmp_path).total_steps == 20
    assert not [m for m in caplog.messages if WARMUP in m or VOCAB in m], caplog.messages


def test_warmup_as_long_as_the_run_and_a_vocabulary_the_corpus_cannot_fill_are_warned_once(tmp_path: Path,
                                                                                          caplog) -> None:
    corpus = tmp_path / "small.txt"
    corpus.write_text("".join(f"document {i} is short and plain\n" for i in range(40)))
    with caplog.at_level(logging.WARNING):
        s = train_in_process([*TINY_GPT, "data=text", f"data.path={corpus}", "data.tokenizer.vocab_size=4096",
                              "trainer.max_steps=3", "scheduler.warmup_steps=5"], tmp_path / "run")
    assert s["steps"] == 3  # warnings, not refusals
    warmup = [m for m in caplog.messages if WARMUP in m]
    vocab = [m for m in caplog.messages if VOCAB in m]
    assert len(warmup) == 1 and "scheduler.warmup_steps=5" in warmup[0] and "(3 training steps)" in warmup[0]
    assert len(vocab) == 1 and "data.tokenizer.vocab_size=4096" in vocab[0], caplog.messages


@pytest.mark.parametrize("steps,warmup_steps,ratio,warns", [(20, None, 0.05, False), (10, None, 0.95, True),
                                                            (10, 9, 0.0, False), (10, 10, 0.0, True)])
def test_warmup_warning_counts_steps_or_the_ratio(steps: int, warmup_steps: int | None, ratio: float, warns: bool,
                                                  caplog) -> None:
    import torch

    from llmtrain.training.optim import scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with caplog.at_level(logging.WARNING, logger="llmtrain.training.optim"):
        scheduler(opt, steps, "linear", warmup_steps, ratio)
    assert any(WARMUP in m for m in caplog.messages) == warns, caplog.messages
