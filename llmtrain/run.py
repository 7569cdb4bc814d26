"""Entry point: compose the config, validate it, instantiate the groups, train, report. Wiring only."""
from __future__ import annotations

import logging
import math
import signal
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig

from llmtrain.runtime import distributed, rundir, workers
from llmtrain.sweeps import callback as sweep
from llmtrain.config import hparams, override_hints, validate
from llmtrain.errors import UserError, writing
from llmtrain.runtime.hardware import quiet_libraries
from llmtrain.training.tracking import write_json, write_status
from llmtrain.training.trainer import Interrupted, Trainer

log = logging.getLogger("llmtrain")


def setup(cfg: DictConfig) -> tuple:
    """Validate one configuration; (hardware, set up; data, tokenized; model), as a run trains them."""
    validate(cfg)
    hardware = instantiate(cfg.hardware)
    hardware.setup(cfg.seed)
    data = instantiate(cfg.data, _convert_="all")
    with distributed.main_first():  # one rank tokenizes into the cache, the others reuse it
        data.setup()
    model = instantiate(cfg.model, _convert_="all").build(data.tokenizer, data.id2label)
    return hardware, data, model


def build_trainer(cfg: DictConfig, run_dir: Path, model_name: str = "model") -> Trainer:
    """The Trainer of one configuration, ready to fit into run_dir."""
    hardware, data, model = setup(cfg)
    return instantiate(cfg.trainer, _convert_="all")(
        model=model, data=data, optimizer=instantiate(cfg.optimizer, _convert_="all"),
        scheduler=instantiate(cfg.scheduler), hardware=hardware, run_dir=run_dir,
        hparams=hparams(cfg, model_name, sum(p.numel() for p in model.parameters()), hardware.precision,
                        distributed.world_size()), settings=rundir.settings(cfg))


def train(cfg: DictConfig, run_dir: Path, model_name: str = "model") -> dict:
    """Validate, instantiate and fit one configuration into run_dir; returns the run's summary."""
    return build_trainer(cfg, run_dir, model_name).fit()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Train and evaluate one configuration; returns the final eval loss (what sweepers minimize)."""
    started = time.perf_counter()
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    in_sweep = hc.mode == RunMode.MULTIRUN
    if in_sweep:  # a rerun into the same sweep directory skips finished jobs and resumes interrupted ones
        longer = any(c.key in rundir.LENGTH for c in rundir.accepted_changes(run_dir))  # ... and lengthened ones
        if not longer and (done := sweep.finished_loss(run_dir)) is not None:
            return done
        cfg = sweep.resumable(cfg)
    quiet_libraries()
    try:
        with writing(None, run_dir):  # the last safety net: a full disk the write sites did not name themselves
            summary = workers.launch(train, cfg, run_dir, hc.runtime.choices.get("model", "model"))  # here or N ranks
            summary.update(status="completed", wall_time_s=time.perf_counter() - started)
            write_json(run_dir / "metrics.json", summary)
    except (UserError, Interrupted) as e:
        if in_sweep and isinstance(e, Interrupted):
            e.again = sweep.rerun_args(hc.sweep.dir)
        log.error("%s%s", "" if isinstance(e, Interrupted) else "error: ", e)
        log.debug("where it was raised (shown with hydra.verbose=llmtrain):", exc_info=True)
        write_status(run_dir, {"status": "interrupted" if isinstance(e, Interrupted) else "failed", "error": str(e)})
        if in_sweep and not isinstance(e, Interrupted):
            return math.nan  # recorded: the sweep runs its other jobs, then exits non-zero naming this one
        sys.exit(e.code if isinstance(e, Interrupted) else 2)  # an interrupt stops the whole sweep
    except KeyboardInterrupt:  # Ctrl-C before training began (the trainer handles it from then on)
        log.error("interrupted before training started; nothing to save%s", f". To continue the sweep, run the "
                  f"same command with {sweep.rerun_args(hc.sweep.dir)}" if in_sweep else "")
        sys.exit(128 + signal.SIGINT)
    except Exception as e:
        if not in_sweep:
            raise
        return sweep.record_failure(run_dir, e)
    log.info("outputs: %s", run_dir)
    log.info("final eval: loss %.4f, perplexity %.2f, accuracy %.4f%s", summary["eval_loss"],
             summary["eval_perplexity"], summary["eval_accuracy"],
             f", NLL/word {summary['eval_nll_per_word']:.3f} (generator floor "
             f"{summary['corpus_validation_nll_per_word']:.3f})" if "eval_nll_per_word" in summary
             and "corpus_validation_nll_per_word" in summary else "")
    return summary["eval_loss"]


if __name__ == "__main__":
    if workers.is_follower():  # under torchrun, ranks > 0 train the jobs rank 0's Hydra composes
        sys.exit(workers.follow(train))
    try:
        workers.lead(main)
    except KeyboardInterrupt:  # Ctrl-C outside a job: Hydra composing a sweep's next job, or writing its summary
        hc = HydraConfig.get() if HydraConfig.initialized() else None
        print("interrupted" + (f". To continue the sweep, run the same command with {sweep.rerun_args(hc.sweep.dir)}"
                               if hc is not None and hc.mode == RunMode.MULTIRUN else ""), file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except SystemExit as exit_:
        if exit_.code == 1:  # Hydra rejected the command line: add a "did you mean" for misspelt keys
            for hint in override_hints(sys.argv[1:]):
                print(hint, file=sys.stderr)
        raise
