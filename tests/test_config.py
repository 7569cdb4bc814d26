"""Every option of every config group composes, and the count matches the files on disk."""
from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONF


def test_every_option_of_every_group_composes() -> None:
    files = sorted(p for p in CONF.rglob("*.yaml") if p.parent != CONF)
    assert len(files) >= 20
    composed = 0
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for f in files:
            rel = f.relative_to(CONF)
            group, option = "/".join(rel.parts[:-1]), f.stem
            cfg = compose(config_name="config", overrides=[f"{group}={option}"], return_hydra_config=True)
            node = OmegaConf.select(cfg, group.replace("/", "."))
            assert node is not None, f"{group}={option} composed to nothing"
            if not group.startswith("hydra"):
                assert "_target_" in node, f"{rel} has no _target_"
                assert cfg.hydra.runtime.choices[group] == option
            composed += 1
    assert composed == len(files)


def test_design_keys_exist() -> None:
    """The keys ../shared/DESIGN.md promises users are all in the default config."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config")
    keys = ["trainer.epochs", "trainer.max_steps", "trainer.batch_size", "trainer.grad_accum_steps",
            "trainer.max_grad_norm", "trainer.log_every", "trainer.eval_every", "trainer.save_every",
            "trainer.keep_last", "trainer.early_stopping.patience", "trainer.resume", "data.max_length", "data.path",
            "data.text_column", "data.label_column", "data.mlm_probability", "data.validation_split", "optimizer.lr",
            "optimizer.weight_decay", "scheduler.warmup_steps", "hardware.device", "hardware.precision",
            "hardware.compile", "hardware.num_threads", "hardware.num_workers", "model.pretrained", "model.config",
            "seed", "data.tokenizer.vocab_size", "data.tokenizer.name"]
    missing = [k for k in keys if OmegaConf.select(cfg, k, default="<absent>") == "<absent>"]
    assert not missing
