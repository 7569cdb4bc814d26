"""The one training loop: accumulation normalized by target tokens, mixed precision, eval, checkpoints, resume."""
from __future__ import annotations

import contextlib
import logging
import math
import shutil
import signal
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmtrain.training import checkpoint, flops, profiling, state
from llmtrain.runtime import distributed, rundir
from llmtrain.data.module import DataModule
from llmtrain.errors import Interrupted  # noqa: F401 - raised here, caught by run.py and workers.py
from llmtrain.errors import ConfigError, NoSpaceError, UserError, writing
from llmtrain.training.evaluation import Evaluator
from llmtrain.runtime.hardware import Hardware, peak_memory_mb
from llmtrain.training.state import RunState
from llmtrain.training.losses import compile_model, count_targets, loss_terms, model_inputs
from llmtrain.training.tracking import Tracker, truncate_after

log = logging.getLogger(__name__)


class Trainer:
    """Runs fit(): train for the configured steps, evaluate, checkpoint, write metrics and the final model."""

    def __init__(self, model: torch.nn.Module, data: DataModule, optimizer: Callable, scheduler: Callable,
                 hardware: Hardware, run_dir: str | Path, hparams: dict, epochs: int, max_steps: int | None,
                 batch_size: int, grad_accum_steps: int, max_grad_norm: float | None, log_every: int, eval_every: int,
                 save_every: int, keep_last: int, eval_max_batches: int | None, max_bad_steps: int,
                 early_stopping: dict, resume: str | None, progress: bool, profile: bool,
                 settings: dict | None = None):
        self.model, self.data, self.hw, self.task = model, data, hardware, data.task
        self.run_dir, self.hparams = Path(run_dir), dict(hparams)
        self.epochs, self.max_steps, self.batch_size, self.accum = epochs, max_steps, batch_size, grad_accum_steps
        self.max_grad_norm, self.log_every, self.eval_every = max_grad_norm, log_every, eval_every
        self.save_every, self.keep_last, self.eval_max_batches = save_every, keep_last, eval_max_batches
        self.max_bad_steps, self.patience = max_bad_steps, int(early_stopping.get("patience") or 0)
        self.min_delta, self.resume, self.progress, self.profile = float(early_stopping.get("min_delta") or 0), resume, progress, profile
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        self.model.to(self.hw.torch_device)
        if hardware.compile:
            compile_model(self.model, self.task)
        # measuring the peak rate (once per machine, then cached) draws random matrices: keep the run's RNG out of it,
        # or a run's dropout would depend on the cache
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if hardware.device == "cuda" else []):
            self.mfu = flops.MFUMeter(self.model, self.task, hardware.device, hardware.compute_dtype, data.cache_dir)
        self.optimizer = optimizer(self.model)
        # data-parallel: DDP wraps model+loss (self.model stays the plain model for eval and saving)
        self.ddp = distributed.wrap(self.model, self.task, self.hw.device) if self.world > 1 else None
        self.steps_per_epoch = math.ceil(data.num_batches("train", batch_size, self.world) / grad_accum_steps)
        self.total_steps = max_steps if max_steps else epochs * self.steps_per_epoch
        self.make_scheduler = scheduler
        self.scheduler = scheduler(self.optimizer, num_training_steps=self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda") if hardware.precision == "fp16" else None
        # position, counters and the settings that made the run: everything a checkpoint restores
        self.run = RunState(total_steps=self.total_steps, world_size=self.world, batch_size=batch_size,
                            settings=dict(settings or {}))
        self.evaluator = Evaluator(data, hardware, batch_size, eval_max_batches)
        self.tracker: Tracker | None = None
        self._signal: int | None = None

    # ---- state ------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.run.step

    def state_dict(self) -> dict:
        return {**self.run.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": checkpoint.rng_state()}

    def restore(self, path: Path) -> None:
        state = checkpoint.load(path, self.model)  # verified by find() already: load() remembers that
        saved = RunState()
        saved.load_state_dict(state)
        self._check_settings(saved, path)
        old_total = saved.total_steps or self.total_steps
        stretch = old_total != self.total_steps and saved.step < old_total
        if stretch:  # built for the saved length, then stretched: the rate goes on from where it was
            self.scheduler = self.make_scheduler(self.optimizer, num_training_steps=old_total)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.run = saved
        if old_total != self.total_steps:
            self._lengthened(old_total, stretch)
        self.run.total_steps, self.run.settings = self.total_steps, self.run.settings or {}
        if (saved.world_size, saved.batch_size) != (self.world, self.batch_size):  # the same place in the epoch
            self.run.batch_in_epoch = distributed.resume_position(
                saved.batch_in_epoch, saved.world_size, saved.batch_size, self.world, self.batch_size,
                self.data.num_batches("train", self.batch_size, self.world))
        self.run.world_size, self.run.batch_size = self.world, self.batch_size
        checkpoint.set_rng_state(state["rng"])  # rank 0's; the other ranks then draw from their own streams
        distributed.reseed()
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.run.step, self.run.epoch,
                 self.run.batch_in_epoch)

    def _check_settings(self, saved: RunState, path: Path) -> None:
        """The checkpoint's settings against this run's (rundir.check); the run's length may only grow."""
        if saved.settings and self.run.settings:
            rundir.check(saved.settings, self.run.settings, f"checkpoint {path}")
            self.run.settings = {**self.run.settings}
        if saved.total_steps and self.total_steps < saved.total_steps and self.total_steps < saved.step:
            raise ConfigError(f"trainer.resume={path}: the checkpoint is at step {saved.step}, past this run's end "
                              f"({self.total_steps} steps): resume with trainer.max_steps of at least {saved.step}")

    def _lengthened(self, old_total: int, stretch: bool) -> None:
        """A resumed run longer than the saved one: a schedule still under way is stretched over the new remaining
        steps; one that had ended (a finished run trained further) is the new length's schedule from here on."""
        step, lr = self.run.step, self.scheduler.get_last_lr()[0]
        if not self.run.early_stopped:
            self.run.final_eval = None  # the run goes on: its end-of-run evaluation is still to come
        if stretch and state.stretch_schedule(self.scheduler, step, old_total, self.total_steps):
            log.info("the run's length grew from %d to %d steps: the rest of the learning-rate schedule (lr %.3g at "
                     "step %d) is stretched over steps %d-%d and ends as the old one would have", old_total,
                     self.total_steps, lr, step, step, self.total_steps)
            return
        rates = [base * f(step) for base, f in zip(self.scheduler.base_lrs, self.scheduler.lr_lambdas)]
        for group, rate in zip(self.optimizer.param_groups, rates):
            group["lr"] = rate
        self.scheduler._last_lr = rates
        log.info("the run's length grew from %d to %d steps%s: from step %d the learning rate follows the schedule "
                 "of a %d-step run (lr %.3g -> %.3g)", old_total, self.total_steps,
                 " after its schedule had ended" if step >= old_total else "", step, self.total_steps, lr, rates[0])

    def save(self, is_best: bool = False) -> None:
        if self.is_main:
            if self.tracker is not None:  # what the checkpoint covers is on disk before the checkpoint is
                self.tracker.flush()
            checkpoint.save(self.run_dir / "checkpoints", self.step, self.model, self.data.tokenizer,
                            self.state_dict(), self.keep_last, is_best)

    # ---- evaluation and training ---------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Token-weighted loss, perplexity and accuracy over the validation set (accuracy and macro-F1 for cls)."""
        return self.evaluator(self.model)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce_sum(t, self.hw.torch_device)

    def _micro_batches(self):
        """Yield groups of grad_accum_steps micro-batches, crossing epochs, from the saved position."""
        run = self.run
        while True:
            group = []
            for batch in self.data.train_batches(self.batch_size, run.epoch, run.batch_in_epoch, self.rank, self.world):
                group.append(batch)
                run.batch_in_epoch += 1
                if len(group) == self.accum:
                    yield group
                    group = []
            if group:  # the epoch's last, shorter step
                yield group
            run.epoch, run.batch_in_epoch = run.epoch + 1, 0

    def train_step(self, group: list[dict[str, torch.Tensor]]) -> tuple[float, float, int]:
        """One optimizer step over the micro-batches; the loss is normalized by all their target tokens."""
        self.mfu.add(group)
        device = self.hw.torch_device
        n_total = self._all_reduce(torch.tensor([float(sum(count_targets(b, self.task) for b in group))],
                                                dtype=torch.float64))[0].item()
        loss_total = torch.zeros((), dtype=torch.float64)
        tokens = 0
        for i, batch in enumerate(group):
            tokens += int(batch["attention_mask"].sum())
            batch = {k: v.to(device, non_blocking=True) for k, v in model_inputs(batch).items()}
            sync = contextlib.nullcontext() if (self.ddp is None or i == len(group) - 1) else self.ddp.no_sync()
            with sync:
                with self.hw.autocast():
                    loss_sum, _, _ = self.ddp(batch) if self.ddp else loss_terms(self.model, batch, self.task)
                # DDP averages gradients over ranks; the global token count is per step, so scale back up
                loss = loss_sum * (self.world / n_total)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_total += loss_sum.detach().double().cpu()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.max_grad_norm if self.max_grad_norm else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        mean_loss = float(self._all_reduce(loss_total.reshape(1))[0] / n_total)
        good = math.isfinite(mean_loss) and (math.isfinite(grad_norm) or self.scaler is not None)
        if self.scaler:
            # fp16: the scaler itself skips an update whose gradients overflowed and lowers the scale; that is
            # how it finds a workable scale, not a fault, so only a non-finite loss counts as a bad step here
            if good:
                self.scaler.step(self.optimizer)
            self.scaler.update()
            if good and not math.isfinite(grad_norm):
                self.run.skipped_steps += 1
                log.info("step %d: fp16 gradients overflowed; update skipped, loss scale now %g", self.step + 1,
                         self.scaler.get_scale())
        elif good:
            self.optimizer.step()
        run = self.run
        if good:
            run.bad_steps = 0
        else:
            run.bad_steps += 1
            run.skipped_steps += 1
            log.warning("step %d: non-finite %s; update skipped (%d in a row)", self.step + 1,
                        "loss" if not math.isfinite(mean_loss) else "gradient", run.bad_steps)
            if run.bad_steps >= self.max_bad_steps:
                raise UserError(f"{run.bad_steps} steps in a row had a non-finite loss or gradient "
                                f"(trainer.max_bad_steps={self.max_bad_steps}): lower optimizer.lr, set "
                                "trainer.max_grad_norm (e.g. 1.0)" + (", or use hardware.precision=fp32"
                                                                      if self.hw.precision != "fp32" else ""))
        if good:
            self.scheduler.step()
        else:  # a skipped update still uses up its step of the schedule, on purpose: no "step order" warning
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        tokens = int(self._all_reduce(torch.tensor([float(tokens)]))[0])
        run.tokens_seen += tokens
        return mean_loss, grad_norm, tokens

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum
        log.warning("%s received: saving a checkpoint after this step", signal.Signals(signum).name)

    def fit(self) -> dict:
        """Train to the end (or an early stop), evaluate, save `model/` and metrics.json; return the summary."""
        if self.resume:
            self._resume()
        self.model.train()  # from_pretrained returns a model in eval mode: dropout would stay off
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        tracker = None
        try:  # whatever happens, the tracker is closed and the signal handlers restored
            tracker = self.tracker = Tracker(self.run_dir, self.is_main)
            start, start_tokens = time.perf_counter(), self.run.tokens_seen
            self.startup_s = flops.seconds_since_process_start()
            self._train(tracker)
            # a signal from here on lets the run finish: the final evaluation and saves are short
            summary = self._finish(tracker, start, start_tokens)
            tracker.close()  # the last events reach the disk here: a full disk now still fails the run
            return summary
        except NoSpaceError as e:  # a checkpoint, model/ or the records: say where a resumed run continues from
            raise e.also(self._resume_hint()) from e.__cause__
        finally:
            if tracker is not None:
                tracker.close(quiet=True)  # after an error: closed without hiding the error being raised
            self._restore(old_handlers)

    def _resume_hint(self) -> str:
        done = checkpoint.step_dirs(self.run_dir / "checkpoints")
        if not done:
            return "no checkpoint was saved yet: run again once there is space"
        return (f"the previous checkpoint, {done[-1][1]}, is intact: once there is space, run the same command with "
                f"hydra.run.dir={self.run_dir} trainer.resume=auto to continue from it")

    def _resume(self) -> None:
        """Continue from the checkpoint trainer.resume names; what the stopped run recorded after it is dropped."""
        with distributed.main_first():  # find() also repairs a checkpoint directory a kill left half-written
            path = checkpoint.find(self.run_dir, self.resume)
        if path is not None:
            self.restore(path)
        elif self.is_main:
            log.info("trainer.resume=auto: no checkpoint in %s yet, starting fresh%s", self.run_dir,
                     " (the records of the run that stopped before its first checkpoint are cleared)"
                     if (self.run_dir / "metrics.jsonl").exists() else "")
        if self.is_main:  # records a stopped run wrote after this checkpoint (or with none: all) would fork the curves
            truncate_after(self.run_dir, self.run.step, self.run.tokens_seen)

    def _train(self, tracker: Tracker) -> None:
        """The loop: one optimizer step, then each once-in-a-while block behind its own condition."""
        run, window = self.run, {"tokens": 0, "t": time.perf_counter()}
        bar = tqdm(total=self.total_steps, initial=run.step, desc="train", dynamic_ncols=True,
                   disable=not (self.progress and self.is_main))
        profiler = profiling.step_profiler(self.profile and self.is_main, self.run_dir, self.hw.device)
        try:
            batches = self._micro_batches()
            while run.step < self.total_steps and not run.early_stopped:
                loss, grad_norm, tokens = self.train_step(next(batches))
                profiler.step()
                bar.update(1)
                if math.isfinite(loss):
                    run.window_loss, run.window_n = run.window_loss + loss, run.window_n + 1
                window["tokens"] += tokens
                if run.step % self.log_every == 0 or run.step == self.total_steps:
                    self._log_train(tracker, grad_norm, window, bar)
                saved = self._maybe_evaluate(tracker)
                if not saved and not run.early_stopped and self._due(self.save_every):
                    self.save()  # the end of the run saves anyway
                self._signal = distributed.agreed_signal(self._signal)  # all ranks stop after the same step
                if self._signal is not None and not run.early_stopped:
                    self.save()
                    raise Interrupted(self._signal, self.run_dir, run.step)
        finally:
            profiler.close()
            bar.close()

    def _due(self, every: int) -> bool:
        """Every `every` steps (0: never), except at the run's last step, which the end of the run covers."""
        return bool(every) and self.run.step % every == 0 and self.run.step < self.total_steps

    def _log_train(self, tracker: Tracker, grad_norm: float, window: dict, bar) -> None:
        run = self.run
        elapsed = time.perf_counter() - window["t"]
        values = {"loss": run.window_loss / max(1, run.window_n), "lr": self.scheduler.get_last_lr()[0],
                  "grad_norm": grad_norm, "tokens_per_sec": window["tokens"] / max(elapsed, 1e-9),
                  "mfu": self.mfu.window_mfu(elapsed)}
        if run.skipped_steps:
            values["skipped_steps"] = run.skipped_steps
        tracker.log("train", run.step, run.tokens_seen, values)
        bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_sec']:.0f}")
        run.window_loss, run.window_n = 0.0, 0
        window.update(tokens=0, t=time.perf_counter())

    def _maybe_evaluate(self, tracker: Tracker) -> bool:
        """Every eval_every steps: evaluate, keep `best`, count patience (an early stop ends the loop with this
        evaluation as the final one). True when it saved a checkpoint."""
        run = self.run
        if not self._due(self.eval_every):
            return False
        result = self.evaluate()
        tracker.log("eval", run.step, run.tokens_seen, result)
        log.info("step %d: eval loss %.4f, perplexity %.2f, accuracy %.4f", run.step, result["loss"],
                 result["perplexity"], result["accuracy"])
        # `best` follows the lowest eval loss; patience counts evaluations since one that beat the loss of the last
        # counted improvement by at least min_delta (as Keras and Lightning do)
        if result["loss"] < run.early_stopping_ref - self.min_delta:
            run.early_stopping_ref, run.evals_since_best = result["loss"], 0
        else:
            run.evals_since_best += 1
            if self.patience and run.evals_since_best >= self.patience:
                log.info("early stopping at step %d: eval loss has not improved by %g over %d evaluations; best %.4f",
                         run.step, self.min_delta, self.patience, min(run.best_eval_loss, result["loss"]))
                run.early_stopped, run.final_eval = True, result
                return False
        if result["loss"] < run.best_eval_loss:
            run.best_eval_loss = result["loss"]
            self.save(is_best=True)
            return True
        return False

    @staticmethod
    def _restore(handlers: dict) -> None:
        for s, h in handlers.items():
            signal.signal(s, h)

    def _finish(self, tracker: Tracker, start: float, start_tokens: int) -> dict:
        """Final evaluation (once: an early stop's, or one a resumed run already made), last checkpoint, model/,
        summary."""
        run = self.run
        train_time = time.perf_counter() - start
        final = run.final_eval
        if final is None:
            final = run.final_eval = self.evaluate()
            tracker.log("eval", run.step, run.tokens_seen, final)
        else:  # logged before this run was stopped (or as the early stop's evaluation): not again
            tracker.logged_before("eval", final)
        is_best = final["loss"] < run.best_eval_loss
        run.best_eval_loss = min(run.best_eval_loss, final["loss"])
        self.save(is_best=is_best)
        summary = {f"eval_{k}": v for k, v in final.items()}
        summary.update({"best_eval_loss": run.best_eval_loss, "steps": run.step, "skipped_steps": run.skipped_steps,
                        "tokens_seen": run.tokens_seen, "tokens_per_sec": (run.tokens_seen - start_tokens) / train_time,
                        "mfu": self.mfu.run_mfu(train_time), "peak_flops": self.mfu.peak, "startup_s": self.startup_s,
                        "train_time_s": train_time, "peak_memory_mb": peak_memory_mb(),
                        "early_stopped": run.early_stopped})
        for k in ("validation_nll_per_word", "unigram_nll_per_word"):
            if k in self.data.info:
                summary[f"corpus_{k}"] = self.data.info[k]
        if self.is_main:
            self._save_final_model()
            tracker.hparams(self.hparams, {k: summary[k] for k in ("eval_loss", "eval_perplexity", "eval_accuracy",
                                                                   "best_eval_loss", "tokens_per_sec", "train_time_s")},
                            run.step)
        return summary

    def _save_final_model(self) -> None:
        """model/ in Hugging Face format, written aside and swapped in whole."""
        out, tmp = self.run_dir / "model", self.run_dir / ".tmp-model"
        shutil.rmtree(tmp, ignore_errors=True)
        with writing("the final model", out, f"free disk space; the last checkpoint, {self.run_dir}/checkpoints/last, "
                     "holds the same weights", partial=tmp):
            checkpoint.write_model(tmp, self.model, self.data.tokenizer)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
