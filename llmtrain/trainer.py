"""The one training loop: accumulation normalized by target tokens, mixed precision, eval, checkpoints, resume."""
from __future__ import annotations

import contextlib
import logging
import math
import resource
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmtrain import checkpoint, metrics
from llmtrain.data import DataModule
from llmtrain.errors import UserError
from llmtrain.hardware import Hardware
from llmtrain.tasks import loss_terms, model_inputs
from llmtrain.tracking import Tracker, write_json

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. `code` is the conventional exit status."""

    def __init__(self, signum: int):
        self.code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}; resume with trainer.resume=auto")


def count_targets(batch: dict[str, torch.Tensor], task: str) -> int:
    labels = batch["labels"]
    if task == "cls":
        return labels.numel()
    return int((labels[:, 1:] if task == "clm" else labels).ne(-100).sum())


class Trainer:
    """Runs fit(): train for the configured steps, evaluate, checkpoint, write metrics and the final model."""

    def __init__(self, model: torch.nn.Module, data: DataModule, optimizer: Callable, scheduler: Callable,
                 hardware: Hardware, run_dir: str | Path, hparams: dict, epochs: int, max_steps: int | None,
                 batch_size: int, grad_accum_steps: int, max_grad_norm: float | None, log_every: int, eval_every: int,
                 save_every: int, keep_last: int, eval_max_batches: int | None, max_bad_steps: int,
                 early_stopping: dict, resume: str | None, progress: bool, profile: bool):
        self.model, self.data, self.hw, self.task = model, data, hardware, data.task
        self.run_dir, self.hparams = Path(run_dir), dict(hparams)
        self.epochs, self.max_steps, self.batch_size, self.accum = epochs, max_steps, batch_size, grad_accum_steps
        self.max_grad_norm, self.log_every, self.eval_every = max_grad_norm, log_every, eval_every
        self.save_every, self.keep_last, self.eval_max_batches = save_every, keep_last, eval_max_batches
        self.max_bad_steps, self.patience = max_bad_steps, int(early_stopping.get("patience") or 0)
        self.min_delta, self.resume, self.progress, self.profile = float(early_stopping.get("min_delta") or 0), resume, progress, profile
        self.rank, self.world = 0, 1
        self.is_main = True
        self.model.to(self.hw.torch_device)
        self.optimizer = optimizer(self.model, device=self.hw.device)
        self.steps_per_epoch = math.ceil(data.num_batches("train", batch_size, self.world) / grad_accum_steps)
        self.total_steps = max_steps if max_steps else epochs * self.steps_per_epoch
        self.scheduler = scheduler(self.optimizer, num_training_steps=self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda") if hardware.precision == "fp16" else None
        self.lm_metric = metrics.load("classification" if self.task == "cls" else "lm_metrics")
        # position and counters: everything a checkpoint must restore
        self.step = self.epoch = self.batch_in_epoch = self.tokens_seen = 0
        self.best_eval_loss, self.bad_steps, self.evals_since_best = math.inf, 0, 0
        self.skipped_steps = 0
        self._signal: int | None = None

    # ---- state ------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "tokens_seen": self.tokens_seen, "best_eval_loss": self.best_eval_loss, "bad_steps": self.bad_steps,
                "skipped_steps": self.skipped_steps, "evals_since_best": self.evals_since_best,
                "world_size": self.world, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": checkpoint.rng_state()}

    def restore(self, path: Path) -> None:
        state = checkpoint.load(path, self._raw_model)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for k in ("step", "epoch", "batch_in_epoch", "tokens_seen", "best_eval_loss", "bad_steps", "skipped_steps",
                  "evals_since_best"):
            setattr(self, k, state[k])
        if state.get("world_size", 1) != self.world:  # recompute the data position from what was consumed
            consumed = state["batch_in_epoch"] * state.get("world_size", 1)
            self.batch_in_epoch = consumed // self.world
        checkpoint.set_rng_state(state["rng"])
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch, self.batch_in_epoch)

    @property
    def _raw_model(self) -> torch.nn.Module:
        return getattr(self.model, "module", self.model)

    def save(self, is_best: bool = False) -> None:
        if self.is_main:
            checkpoint.save(self.run_dir / "checkpoints", self.step, self._raw_model, self.data.tokenizer,
                            self.state(), self.keep_last, is_best)

    # ---- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted loss, perplexity and accuracy over the validation set (accuracy and macro-F1 for cls)."""
        self.model.eval()
        totals = torch.zeros(3, dtype=torch.float64)
        preds: list[int] = []
        refs: list[int] = []
        for batch in self.data.eval_batches(self.batch_size, self.eval_max_batches, self.rank, self.world):
            batch = {k: v.to(self.hw.torch_device) for k, v in model_inputs(batch).items()}
            with self.hw.autocast():
                if self.task == "cls":
                    logits = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits.float()
                    loss_sum = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")
                    preds += logits.argmax(-1).tolist()
                    refs += batch["labels"].tolist()
                    n, correct = batch["labels"].numel(), (logits.argmax(-1) == batch["labels"]).sum()
                else:
                    loss_sum, n, correct = loss_terms(self.model, batch, self.task)
            totals += torch.tensor([float(loss_sum), float(n), float(correct)], dtype=torch.float64)
        totals = self._all_reduce(totals)
        self.model.train()
        if self.task == "cls":
            self.lm_metric.add_batch(predictions=preds, references=refs)
            out = self.lm_metric.compute()
            loss = float(totals[0] / totals[1])
            return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "accuracy": out["accuracy"],
                    "macro_f1": out["macro_f1"]}
        lm = metrics.load("lm_metrics") if self.lm_metric is None else self.lm_metric
        lm.add_batch(loss_sum=[float(totals[0])], n_tokens=[int(totals[1])], n_correct=[int(totals[2])])
        out = lm.compute()
        result = {"loss": out["loss"], "perplexity": out["perplexity"], "accuracy": out["accuracy"]}
        words = self.data.info.get("validation_words")
        if self.task == "clm" and words and self.eval_max_batches is None:
            result["nll_per_word"] = out["loss"] * self.data.info["validation_tokens"] / words
        return result

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.to(self.hw.torch_device)
            torch.distributed.all_reduce(t)
            t = t.cpu()
        return t

    # ---- training -----------------------------------------------------------------------------
    def _micro_batches(self):
        """Yield groups of grad_accum_steps micro-batches, crossing epochs, from the saved position."""
        while True:
            group = []
            for batch in self.data.train_batches(self.batch_size, self.epoch, self.batch_in_epoch, self.rank, self.world):
                group.append(batch)
                self.batch_in_epoch += 1
                if len(group) == self.accum:
                    yield group
                    group = []
            if group:  # the epoch's last, shorter step
                yield group
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def train_step(self, group: list[dict[str, torch.Tensor]]) -> tuple[float, float, int]:
        """One optimizer step over the micro-batches; the loss is normalized by all their target tokens."""
        device = self.hw.torch_device
        n_total = self._all_reduce(torch.tensor([float(sum(count_targets(b, self.task) for b in group))],
                                                dtype=torch.float64))[0].item()
        loss_total = torch.zeros((), dtype=torch.float64)
        tokens = 0
        for i, batch in enumerate(group):
            tokens += int(batch["attention_mask"].sum())
            batch = {k: v.to(device, non_blocking=True) for k, v in model_inputs(batch).items()}
            sync = contextlib.nullcontext() if (self.world == 1 or i == len(group) - 1) else self.model.no_sync()
            with sync:
                with self.hw.autocast():
                    loss_sum, _, _ = loss_terms(self.model, batch, self.task)
                # DDP averages gradients over ranks; the global token count is per step, so scale back up
                loss = loss_sum * (self.world / n_total)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_total += loss_sum.detach().double().cpu()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.max_grad_norm if self.max_grad_norm else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        mean_loss = float(self._all_reduce(loss_total.reshape(1))[0] / n_total)
        if math.isfinite(mean_loss) and math.isfinite(grad_norm):
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            self.skipped_steps += 1
            log.warning("step %d: non-finite %s; update skipped (%d in a row)", self.step + 1,
                        "loss" if not math.isfinite(mean_loss) else "gradient", self.bad_steps)
            if self.bad_steps >= self.max_bad_steps:
                raise UserError(f"{self.bad_steps} steps in a row had a non-finite loss or gradient "
                                f"(trainer.max_bad_steps={self.max_bad_steps}): lower optimizer.lr, set "
                                "trainer.max_grad_norm (e.g. 1.0), or use hardware.precision=fp32")
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens = int(self._all_reduce(torch.tensor([float(tokens)]))[0])
        self.tokens_seen += tokens
        return mean_loss, grad_norm, tokens

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum
        log.warning("%s received: saving a checkpoint after this step", signal.Signals(signum).name)

    def fit(self) -> dict:
        """Train to the end (or an early stop), evaluate, save `model/` and metrics.json; return the summary."""
        if self.resume:
            path = checkpoint.find(self.run_dir, self.resume)
            if path is not None:
                self.restore(path)
            else:
                log.info("trainer.resume=auto: no checkpoint in %s yet, starting fresh", self.run_dir)
        tracker = Tracker(self.run_dir, self.is_main, purge_step=self.step + 1 if self.step else None)
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        start, start_tokens = time.perf_counter(), self.tokens_seen
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not (self.progress and self.is_main),
                   dynamic_ncols=True)
        window = {"loss": 0.0, "n": 0, "tokens": 0, "t": time.perf_counter()}
        last_eval: dict[str, float] = {}
        stop_early = False
        try:
            batches = self._micro_batches()
            while self.step < self.total_steps and not stop_early:
                loss, grad_norm, tokens = self.train_step(next(batches))
                window["loss"] += loss if math.isfinite(loss) else 0.0
                window["n"] += 1 if math.isfinite(loss) else 0
                window["tokens"] += tokens
                bar.update(1)
                if self.step % self.log_every == 0 or self.step == self.total_steps:
                    elapsed = time.perf_counter() - window["t"]
                    values = {"loss": window["loss"] / max(1, window["n"]), "lr": self.scheduler.get_last_lr()[0],
                              "grad_norm": grad_norm, "tokens_per_sec": window["tokens"] / max(elapsed, 1e-9)}
                    tracker.log("train", self.step, self.tokens_seen, values)
                    bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_sec']:.0f}")
                    window = {"loss": 0.0, "n": 0, "tokens": 0, "t": time.perf_counter()}
                saved = False
                if self.eval_every and self.step % self.eval_every == 0 and self.step < self.total_steps:
                    last_eval = self.evaluate()
                    tracker.log("eval", self.step, self.tokens_seen, last_eval)
                    log.info("step %d: eval loss %.4f, perplexity %.2f, accuracy %.4f", self.step, last_eval["loss"],
                             last_eval["perplexity"], last_eval["accuracy"])
                    improved = last_eval["loss"] < self.best_eval_loss - self.min_delta
                    if improved:
                        self.best_eval_loss, self.evals_since_best = last_eval["loss"], 0
                        self.save(is_best=True)
                        saved = True
                    else:
                        self.best_eval_loss = min(self.best_eval_loss, last_eval["loss"])
                        self.evals_since_best += 1
                        if self.patience and self.evals_since_best >= self.patience:
                            log.info("early stopping: no improvement over %d evaluations", self.patience)
                            stop_early = True
                if not saved and self.save_every and self.step % self.save_every == 0:
                    self.save()
                if self._signal is not None:
                    self.save()
                    raise Interrupted(self._signal)
        finally:
            bar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        train_time = time.perf_counter() - start
        final = self.evaluate()
        tracker.log("eval", self.step, self.tokens_seen, final)
        is_best = final["loss"] < self.best_eval_loss - self.min_delta or not math.isfinite(self.best_eval_loss)
        self.best_eval_loss = min(self.best_eval_loss, final["loss"])
        if not stop_early or is_best:
            self.save(is_best=is_best)
        summary = {f"eval_{k}": v for k, v in final.items()}
        summary.update({"best_eval_loss": self.best_eval_loss, "steps": self.step, "skipped_steps": self.skipped_steps,
                        "tokens_seen": self.tokens_seen, "tokens_per_sec": (self.tokens_seen - start_tokens) / train_time,
                        "train_time_s": train_time, "peak_memory_mb": peak_memory_mb(),
                        "early_stopped": stop_early})
        for k in ("validation_nll_per_word", "unigram_nll_per_word"):
            if k in self.data.info:
                summary[f"corpus_{k}"] = self.data.info[k]
        if self.is_main:
            self._save_final_model()
            tracker.hparams(self.hparams, {k: summary[k] for k in ("eval_loss", "eval_perplexity", "eval_accuracy",
                                                                   "best_eval_loss", "tokens_per_sec", "train_time_s")})
        tracker.close()
        return summary

    def _save_final_model(self) -> None:
        out, tmp = self.run_dir / "model", self.run_dir / ".tmp-model"
        self._raw_model.save_pretrained(tmp, safe_serialization=True)
        self.data.tokenizer.save_pretrained(tmp)
        if out.exists():
            import shutil

            shutil.rmtree(out)
        tmp.rename(out)


def peak_memory_mb() -> float:
    """Peak resident memory of this process (CUDA: peak allocated on the GPU as well)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rss = max(rss, torch.cuda.max_memory_allocated() / 2**20)
    return rss
