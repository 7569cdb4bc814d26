"""The peers llmtrain is measured against, each run in a process of its own by benchmarks/bench.py.

    python -m benchmarks.peers {hf_bf16,hf_fp32,seed,prepare} --steps N [--budget S] --out FILE -- <overrides>

Every peer builds the same model from the same seed and config as `python -m llmtrain.run <overrides>` does (so the
initial weights are identical), trains it for N steps of the same batch size, and writes one JSON line per step to
FILE: the time the step ended, its real (non-padding) tokens, its loss and the model FLOPs it executed.

- hf_bf16 / hf_fp32: Hugging Face Trainer on llmtrain's packed blocks, with exactly llmtrain's batches and masks in
  llmtrain's order (so the losses are comparable), `bf16=True` or its default fp32, and its default (fused) AdamW.
- seed: the seed guide's loop, reimplemented faithfully: every line of the corpus padded to max_length and tokenized
  in the collate function, DataLoader with its 4 workers, plain AdamW + linear warmup, loss.item() every step, a
  checkpoint at step 0; with the masked-LM labels its guide forgot (DataCollatorForLanguageModeling's masking).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


class Recorder:
    """Appends one JSON object per line to the output file, flushed at once (a killed peer keeps what it did)."""

    def __init__(self, path: str):
        self.f = open(path, "a", buffering=1)

    def __call__(self, **record) -> None:
        self.f.write(json.dumps(record) + "\n")

    def end(self, **info) -> None:
        self(event="end", peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **info)


def build(overrides: list[str]):
    """(cfg, hardware, data, model) exactly as llmtrain.run.train builds them: same seed, so the same weights."""
    from hydra import compose, initialize_config_dir

    from llmtrain.runtime.hardware import quiet_libraries
    from llmtrain.run import setup

    with initialize_config_dir(config_dir=str(ROOT / "llmtrain" / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    quiet_libraries()
    return (cfg, *setup(cfg))


def dense_flops(model: torch.nn.Module, task: str):
    """FLOPs per batch for a peer that runs the whole head at every position (no sparse masked-LM head)."""
    from llmtrain.training.flops import FlopModel

    return dataclasses.replace(FlopModel.of(model, task), sparse_head=False).train_flops


def warmup_steps(cfg, steps: int) -> int:
    """llmtrain's warmup for a run of `steps` steps, so the HF peers follow the same learning-rate schedule."""
    s = cfg.scheduler
    return s.warmup_steps if s.warmup_steps is not None else int(round(s.warmup_ratio * steps))


# ---- Hugging Face Trainer -----------------------------------------------------------------------------------------
def hf_trainer(overrides: list[str], bf16: bool, steps: int, budget: float, rec: Recorder) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    cfg, hardware, data, model = build(overrides)
    bs = cfg.trainer.batch_size
    batches = list(itertools.islice(data.train_batches(bs, 0), steps))
    rows = [{k: b[k][i] for k in ("input_ids", "attention_mask", "labels")} for b in batches
            for i in range(len(b["input_ids"]))]
    flops = dense_flops(model, data.task)
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    step_flops = [flops(b) for b in batches]

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int) -> dict:
            return rows[i]

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.time()
            rec(event="start", time=self.t0)

        def on_step_end(self, args, state, control, **kw):
            i = state.global_step
            rec(event="step", step=i, time=time.time(), tokens=tokens[i - 1], flops=step_flops[i - 1])
            if time.time() - self.t0 > budget:
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                rec(event="loss", step=state.global_step, loss=float(logs["loss"]))

    opt = cfg.optimizer
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=bs, max_steps=steps, learning_rate=opt.lr,
            weight_decay=opt.weight_decay, adam_beta1=opt.betas[0], adam_beta2=opt.betas[1], adam_epsilon=opt.eps,
            lr_scheduler_type=cfg.scheduler.name, warmup_steps=warmup_steps(cfg, steps),
            max_grad_norm=cfg.trainer.max_grad_norm, logging_steps=1, save_strategy="no", eval_strategy="no",
            report_to="none", bf16=bf16, use_cpu=hardware.device == "cpu", dataloader_num_workers=0, seed=cfg.seed,
            train_sampling_strategy="sequential", disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=Rows(), data_collator=default_data_collator,
                          callbacks=[Timer()])
        trainer.train()
        rec.end(optimizer=str(args.optim), precision="bf16" if bf16 else "fp32")


# ---- the seed guide's loop ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class SeedConfig:
    """The seed guide's TrainingConfig, with the benchmark's batch size and length (equal for every peer)."""

    batch_size: int = 8
    max_length: int = 128
    learning_rate: float = 2e-5
    num_epochs: int = 3
    warmup_steps: int = 500
    device: str = "cpu"
    num_workers: int = 4
    output_dir: str = "outputs"
    logging_steps: int = 100
    save_steps: int = 1000


def seed_lines(cfg, data) -> list[str]:
    """The corpus as the guide's load_dataset gives it: one row per line of the training file, blank lines included."""
    if cfg.data.source == "wikitext2" and cfg.data.path:
        root = Path(cfg.data.path)
        train = next(f for f in (root / "wiki.train.raw", root / "wiki.train.tokens") if f.is_file())
        return train.read_text(encoding="utf-8").splitlines(keepends=True)
    return data._load_raw().train  # the built-in corpus: one story per line


def create_dataloaders(dataset, tokenizer, config: SeedConfig, shuffle: bool = True):
    """The guide's create_dataloaders: tokenize and pad every line to max_length in the collate function."""
    from transformers import DataCollatorForLanguageModeling

    masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)

    def collate_fn(examples):
        batch = tokenizer([e["text"] for e in examples], truncation=True, padding="max_length",
                          max_length=config.max_length, return_tensors="pt", return_special_tokens_mask=True)
        # the labels the guide's masked LM needs and never made
        batch["input_ids"], batch["labels"] = masker.torch_mask_tokens(batch["input_ids"],
                                                                       batch.pop("special_tokens_mask"))
        return batch

    return torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=shuffle, collate_fn=collate_fn,
                                       num_workers=config.num_workers)


def seed_loop(overrides: list[str], steps: int, rec: Recorder) -> None:
    """The guide's Trainer.train (with its get_optimizer_and_scheduler), stopped after `steps` steps."""
    import datasets
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    cfg, hardware, data, model = build(overrides)
    with tempfile.TemporaryDirectory() as out:
        config = SeedConfig(batch_size=cfg.trainer.batch_size, max_length=cfg.data.max_length, output_dir=out)
        dataset = datasets.Dataset.from_dict({"text": seed_lines(cfg, data)})
        train_dataloader = create_dataloaders(dataset, data.tokenizer, config, shuffle=True)
        flops = dense_flops(model, data.task)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
        scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=config.warmup_steps,
                                                    num_training_steps=len(train_dataloader) * config.num_epochs)
        writer = SummaryWriter(config.output_dir)
        model.train()
        rec(event="start", time=time.time())
        progress_bar = tqdm(train_dataloader, desc="Epoch 1", disable=True)
        for step, batch in enumerate(progress_bar):
            batch = {k: v.to(config.device) for k, v in batch.items()}
            outputs = model(**batch)
            loss = outputs.loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            progress_bar.set_postfix({"loss": loss.item()})
            if step % config.logging_steps == 0:
                writer.add_scalar("train/loss", loss.item(), step)
            if step % config.save_steps == 0:  # the guide's save_checkpoint, at step 0 too
                checkpoint_dir = os.path.join(config.output_dir, f"checkpoint-0-{step}")
                model.save_pretrained(checkpoint_dir)
                torch.save({"epoch": 0, "step": step, "optimizer_state_dict": optimizer.state_dict(),
                            "scheduler_state_dict": scheduler.state_dict()},
                           os.path.join(checkpoint_dir, "training_state.pt"))
            rec(event="step", step=step + 1, time=time.time(), tokens=int(batch["attention_mask"].sum()),
                flops=flops(batch), loss=loss.item())
            if step + 1 >= steps:
                break
        writer.close()
        rec.end(optimizer="AdamW (per-tensor loop)", precision="fp32")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peer", choices=["hf_bf16", "hf_fp32", "seed", "prepare"])
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--budget", type=float, default=float("inf"), help="stop after this many seconds of training")
    parser.add_argument("--out", required=True)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, overrides = parser.parse_args(argv[:cut]), argv[cut + 1:]
    rec = Recorder(args.out)
    if args.peer == "prepare":  # fill the caches (tokenizer, packed blocks), so no peer's peak RSS includes that
        build(overrides)
    elif args.peer == "seed":
        seed_loop(overrides, args.steps, rec)
    else:
        hf_trainer(overrides, args.peer == "hf_bf16", args.steps, args.budget, rec)


if __name__ == "__main__":
    main(sys.argv[1:])
