"""Entry point: compose the config, validate it, instantiate the groups, train, report. Wiring only."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig

from llmtrain.config import hparams, validate
from llmtrain.errors import UserError
from llmtrain.tracking import write_json
from llmtrain.trainer import Interrupted

log = logging.getLogger("llmtrain")


def quiet_libraries() -> None:
    """Our own progress bar and log lines are the run's output; silence the libraries' bars and chatter."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def train(cfg: DictConfig, run_dir: Path, model_name: str = "model") -> dict:
    """Validate, instantiate and fit one configuration into run_dir; returns the run's summary."""
    validate(cfg)
    hardware = instantiate(cfg.hardware)
    hardware.setup(cfg.seed)
    data = instantiate(cfg.data, _convert_="all")
    data.setup()
    model = instantiate(cfg.model, _convert_="all").build(data.tokenizer, data.id2label)
    trainer = instantiate(cfg.trainer, _convert_="all")(
        model=model, data=data, optimizer=instantiate(cfg.optimizer, _convert_="all"),
        scheduler=instantiate(cfg.scheduler), hardware=hardware, run_dir=run_dir,
        hparams=hparams(cfg, model_name, sum(p.numel() for p in model.parameters()), hardware.precision))
    return trainer.fit()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Train and evaluate one configuration; returns the final eval loss (what sweepers minimize)."""
    started = time.perf_counter()
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    quiet_libraries()
    try:
        summary = train(cfg, run_dir, hc.runtime.choices.get("model", "model"))
    except (UserError, Interrupted) as e:
        log.error("error: %s", e)
        write_json(run_dir / "metrics.json", {"status": "interrupted" if isinstance(e, Interrupted) else "failed",
                                              "error": str(e)})
        if hc.mode == RunMode.MULTIRUN:
            raise  # the sweep records this job as failed and carries on with the others
        sys.exit(e.code if isinstance(e, Interrupted) else 2)
    summary.update(status="completed", wall_time_s=time.perf_counter() - started)
    write_json(run_dir / "metrics.json", summary)
    log.info("outputs: %s", run_dir)
    log.info("final eval: loss %.4f, perplexity %.2f, accuracy %.4f%s", summary["eval_loss"],
             summary["eval_perplexity"], summary["eval_accuracy"],
             f", NLL/word {summary['eval_nll_per_word']:.3f} (generator floor "
             f"{summary['corpus_validation_nll_per_word']:.3f})" if "eval_nll_per_word" in summary
             and "corpus_validation_nll_per_word" in summary else "")
    return summary["eval_loss"]


if __name__ == "__main__":
    main()
