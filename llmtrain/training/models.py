"""The model group: a Hugging Face architecture built from config kwargs, or loaded from a pretrained checkpoint."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
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

    def __post_init__(self) -> None:
        self.config = {k: v for k, v in dict(self.config or {}).items() if v is not None}

    def hf_config(self) -> PretrainedConfig:
        """The HF config this spec describes, without building weights (cheap: used for validation too)."""
        if self.task not in AUTO_CLASSES:
            raise ConfigError(f"model.task={self.task!r}: use one of {', '.join(AUTO_CLASSES)}")
        if self.pretrained:
            try:
                return AutoConfig.from_pretrained(self.pretrained, trust_remote_code=self.trust_remote_code,
                                                  **dict(self.config))
            except (OSError, ValueError) as e:
                if "custom code" in str(e) and not self.trust_remote_code:
                    raise ConfigError(f"model.pretrained={self.pretrained}: the checkpoint comes with its own Python "
                                      "code, which runs only with model.trust_remote_code=true (read it first)") from None
                where = "no such directory" if not os.path.exists(self.pretrained) else str(e).splitlines()[0]
                raise ConfigError(f"model.pretrained={self.pretrained}: cannot load ({where}); name a local "
                                  "Hugging Face model directory or a reachable Hub id") from None
        try:
            return AutoConfig.for_model(self.arch, **dict(self.config))
        except ValueError as e:
            raise ConfigError(f"model.arch={self.arch!r}: {str(e).splitlines()[0]}") from None
        except TypeError as e:
            raise ConfigError(f"model.config: {e}") from None

    def build(self, tokenizer: PreTrainedTokenizerBase, id2label: dict[int, str] | None = None) -> PreTrainedModel:
        """Instantiate the model: fresh weights sized to the tokenizer, or the checkpoint's weights."""
        cls = AUTO_CLASSES[self.task]
        extra: dict = {}
        if self.task == "cls" and id2label:
            extra = {"num_labels": len(id2label), "id2label": dict(id2label),
                     "label2id": {v: k for k, v in id2label.items()}}
        if self.pretrained:
            model = self._from_pretrained(cls, extra)
            if len(tokenizer) > model.get_input_embeddings().num_embeddings:
                model.resize_token_embeddings(len(tokenizer))
            if model.config.pad_token_id is None:  # GPT-2 checkpoints have none; a classifier needs it
                model.config.pad_token_id = tokenizer.pad_token_id
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
        log.info("model: %s %s, %.2fM parameters%s", model.config.model_type, self.task, n / 1e6,
                 f", from {self.pretrained}" if self.pretrained else ", from scratch")
        return model

    def _from_pretrained(self, cls: type, extra: dict) -> PreTrainedModel:
        """Load the checkpoint for this task; name every weight that is new, replaced or left unused."""
        saved = self.hf_config()
        # A classifier checkpoint with another number of classes keeps its encoder and gets a new head.
        was_classifier = any(a.endswith("ForSequenceClassification") for a in saved.architectures or [])
        new_head = was_classifier and "num_labels" in extra and saved.num_labels != extra["num_labels"]
        try:
            model, info = cls.from_pretrained(self.pretrained, trust_remote_code=self.trust_remote_code,
                                              output_loading_info=True, ignore_mismatched_sizes=new_head,
                                              **extra, **dict(self.config))
        except RuntimeError as e:  # shapes differ: model.config overrides that contradict the checkpoint
            first = str(e).splitlines()[0]
            raise ConfigError(f"model.pretrained={self.pretrained}: the checkpoint's weights do not fit this model "
                              f"({first}); drop the model.config overrides that change sizes") from None
        src = self.pretrained
        if info.get("missing_keys"):
            log.info("new weights, randomly initialized (not in %s): %s", src, ", ".join(sorted(info["missing_keys"])))
        if info.get("mismatched_keys"):
            log.info("new weights, replaced (their shape differs in %s): %s", src,
                     ", ".join(sorted(k[0] for k in info["mismatched_keys"])))
        if info.get("unexpected_keys"):
            log.info("weights in %s this task does not use: %s", src, ", ".join(sorted(info["unexpected_keys"])))
        if not any(info.get(k) for k in ("missing_keys", "mismatched_keys")):
            log.info("all weights loaded from %s (none new)", src)
        if self.task == "cls" and "id2label" in extra and not new_head:
            align_label_order(model, saved.id2label, extra["id2label"])
        return model


def align_label_order(model: PreTrainedModel, saved: dict[int, str], wanted: dict[int, str]) -> None:
    """A classifier checkpoint trained on the same label names in another order: permute its output rows to ours."""
    if set(saved.values()) != set(wanted.values()) or all(saved[i] == wanted[i] for i in wanted):
        return
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == len(wanted)][-1]
    old_index = {name: i for i, name in saved.items()}
    perm = torch.tensor([old_index[wanted[i]] for i in range(len(wanted))])
    with torch.no_grad():
        head.weight.copy_(head.weight[perm])
        if head.bias is not None:
            head.bias.copy_(head.bias[perm])
    log.info("classifier head: reordered the checkpoint's classes to %s", ", ".join(wanted.values()))
