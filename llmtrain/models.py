"""The model group: a Hugging Face architecture built from config kwargs, or loaded from a pretrained checkpoint."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification,
                          PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase)

from llmtrain.errors import ConfigError

log = logging.getLogger(__name__)

AUTO_CLASSES = {"mlm": AutoModelForMaskedLM, "clm": AutoModelForCausalLM, "cls": AutoModelForSequenceClassification}


@dataclass
class ModelSpec:
    """What to build: the task, the HF architecture (`model_type`) and its config kwargs, or a checkpoint."""

    task: str
    arch: str
    pretrained: str | None = None
    trust_remote_code: bool = False
    config: dict = field(default_factory=dict)

    def hf_config(self) -> PretrainedConfig:
        """The HF config this spec describes, without building weights (cheap: used for validation too)."""
        if self.task not in AUTO_CLASSES:
            raise ConfigError(f"model.task={self.task!r}: use one of {', '.join(AUTO_CLASSES)}")
        if self.pretrained:
            try:
                return AutoConfig.from_pretrained(self.pretrained, trust_remote_code=self.trust_remote_code,
                                                  **dict(self.config))
            except (OSError, ValueError) as e:
                where = "no such directory" if not os.path.exists(self.pretrained) else str(e).splitlines()[0]
                raise ConfigError(f"model.pretrained={self.pretrained}: cannot load ({where}); name a local "
                                  "Hugging Face model directory or a reachable Hub id") from None
        try:
            return AutoConfig.for_model(self.arch, **dict(self.config))
        except ValueError as e:
            raise ConfigError(f"model.arch={self.arch!r}: {str(e).splitlines()[0]}") from None
        except TypeError as e:
            raise ConfigError(f"model.config: {e}") from None

    def max_positions(self) -> int | None:
        return getattr(self.hf_config(), "max_position_embeddings", None)

    def build(self, tokenizer: PreTrainedTokenizerBase, id2label: dict[int, str] | None = None) -> PreTrainedModel:
        """Instantiate the model: fresh weights sized to the tokenizer, or the checkpoint's weights."""
        cls = AUTO_CLASSES[self.task]
        extra: dict = {}
        if self.task == "cls" and id2label:
            extra = {"num_labels": len(id2label), "id2label": dict(id2label),
                     "label2id": {v: k for k, v in id2label.items()}}
        if self.pretrained:
            model, info = cls.from_pretrained(self.pretrained, trust_remote_code=self.trust_remote_code,
                                              output_loading_info=True, **extra, **dict(self.config))
            if info.get("missing_keys"):
                log.info("new weights (not in %s): %s", self.pretrained, ", ".join(sorted(info["missing_keys"])))
            if len(tokenizer) > model.get_input_embeddings().num_embeddings:
                model.resize_token_embeddings(len(tokenizer))
        else:
            config = self.hf_config()
            config.vocab_size = len(tokenizer)
            config.pad_token_id = tokenizer.pad_token_id
            if tokenizer.eos_token_id is not None:
                config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
            for k, v in extra.items():
                setattr(config, k, v)
            model = cls.from_config(config, trust_remote_code=self.trust_remote_code)
        n = sum(p.numel() for p in model.parameters())
        log.info("model: %s %s, %.2fM parameters%s", self.arch, self.task, n / 1e6,
                 f", from {self.pretrained}" if self.pretrained else ", from scratch")
        return model
