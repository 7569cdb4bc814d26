"""Per-task loss: masked LM, causal LM, classification. Each returns summed loss, target count and correct count.

Losses are sums over target tokens (not means), so the Trainer can normalize by the number of
targets across all micro-batches of a step, and evaluation can weight every token equally.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # importing transformers' modeling code costs seconds of start-up; only the type is needed here
    from transformers import PreTrainedModel

Batch = dict[str, torch.Tensor]
IGNORE = -100
COMPILED = "_llmtrain_compiled"  # set on a model by compile_model: the torch.compile backend


def _distilbert_head(model: PreTrainedModel, h: torch.Tensor) -> torch.Tensor:
    return model.vocab_projector(model.vocab_layer_norm(model.activation(model.vocab_transform(h))))


def _bert_head(model: PreTrainedModel, h: torch.Tensor) -> torch.Tensor:
    return model.cls(h)


def _roberta_head(model: PreTrainedModel, h: torch.Tensor) -> torch.Tensor:
    return model.lm_head(h)


# model_type -> (the encoder's attribute, the MLM head as a function of (model, hidden states)). Every head here works
# position by position, so running it on the masked positions only is the same math as running it everywhere.
SPARSE_MLM: dict[str, tuple[str, Callable]] = {"distilbert": ("distilbert", _distilbert_head),
                                               "bert": ("bert", _bert_head), "roberta": ("roberta", _roberta_head)}


def sparse_mlm_parts(model: PreTrainedModel) -> tuple[torch.nn.Module, Callable] | None:
    """(encoder, head) for masked-LM architectures whose head works per position, else None (the dense path)."""
    entry = SPARSE_MLM.get(model.config.model_type)
    if entry is None or not hasattr(model, entry[0]):
        return None
    return getattr(model, entry[0]), entry[1]


def _terms(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed fp32 cross-entropy, number of targets and correct argmax predictions; IGNORE targets count for nothing."""
    logits = logits.float().reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != IGNORE
    loss = F.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE)
    correct = ((logits.argmax(-1) == targets) & keep).sum()
    return loss, keep.sum(), correct


def _sparse_terms(model: PreTrainedModel, head: Callable, h: torch.Tensor, targets: torch.Tensor):
    return _terms(head(model, h), targets)


@functools.cache
def _compiled(fn: Callable, backend: str) -> Callable:
    return torch.compile(fn, backend=backend)


def loss_terms(model: PreTrainedModel, batch: Batch, task: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed loss in fp32, number of targets, number of correct argmax predictions) for one batch.

    Masked LM runs the head at the masked positions only (SPARSE_MLM architectures): the vocabulary projection is most
    of a small masked LM's compute, and running it on the ~15% of positions that carry a target is the same math.
    """
    labels = batch["labels"]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    backend = getattr(model, COMPILED, None)
    parts = sparse_mlm_parts(model) if task == "mlm" else None
    if parts is not None:
        encoder, head = parts
        hidden = encoder(**inputs)[0]
        selected = labels != IGNORE
        h, targets = hidden[selected], labels[selected]
        if backend is None:
            return _sparse_terms(model, head, h, targets)
        # the number of masked positions changes every batch: compile the head for any number at once
        torch._dynamo.maybe_mark_dynamic(h, 0)
        torch._dynamo.maybe_mark_dynamic(targets, 0)
        return _compiled(_sparse_terms, backend)(model, head, h, targets)
    logits = model(**inputs).logits
    if task == "clm":  # position t predicts token t+1; padding the labels, not slicing the logits, saves a copy
        labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    return (_compiled(_terms, backend) if backend else _terms)(logits, labels)


def compile_model(model: PreTrainedModel, task: str, backend: str = "inductor") -> None:
    """hardware.compile=true: compile, in place, the forward loss_terms runs (the encoder alone on the sparse masked-LM
    path, else the whole model); loss_terms then compiles the head and loss too. Saving and loading are unchanged."""
    parts = sparse_mlm_parts(model) if task == "mlm" else None
    (parts[0] if parts is not None else model).compile(backend=backend)
    setattr(model, COMPILED, backend)


def model_inputs(batch: Batch) -> Batch:
    """Drop an all-ones attention mask: packed blocks need none, and without it SDPA takes its fast path."""
    if "attention_mask" in batch and bool(batch["attention_mask"].all()):
        return {k: v for k, v in batch.items() if k != "attention_mask"}
    return batch


def count_targets(batch: dict[str, torch.Tensor], task: str) -> int:
    labels = batch["labels"]
    if task == "cls":
        return labels.numel()
    return int((labels[:, 1:] if task == "clm" else labels).ne(IGNORE).sum())
