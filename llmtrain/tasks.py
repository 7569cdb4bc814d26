"""Per-task loss: masked LM, causal LM, classification. Each returns summed loss, target count and correct count.

Losses are sums over target tokens (not means), so the Trainer can normalize by the number of
targets across all micro-batches of a step, and evaluation can weight every token equally.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

Batch = dict[str, torch.Tensor]


def _mlm_hidden_head(model: PreTrainedModel):
    """(encoder, head) for architectures whose MLM head works per position, else None."""
    kind = model.config.model_type
    if kind == "distilbert":
        def head(h: torch.Tensor) -> torch.Tensor:
            return model.vocab_projector(model.vocab_layer_norm(model.activation(model.vocab_transform(h))))
        return model.distilbert, head
    if kind == "bert" and hasattr(model, "cls"):
        return model.bert, model.cls
    return None


def mlm_logits(model: PreTrainedModel, batch: Batch, selected: torch.Tensor) -> torch.Tensor:
    """Logits at the masked positions only.

    The vocabulary projection is most of a small masked LM's compute; running it on the ~15% of
    positions that carry a target instead of all of them is the same math, several times cheaper.
    Architectures not listed in _mlm_hidden_head take the dense path.
    """
    parts = _mlm_hidden_head(model)
    if parts is None:
        return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits[selected]
    encoder, head = parts
    hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))[0]
    return head(hidden[selected])


def loss_terms(model: PreTrainedModel, batch: Batch, task: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed loss in fp32, number of targets, number of correct argmax predictions) for one batch."""
    labels = batch["labels"]
    if task == "cls":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        targets = labels
    elif task == "mlm":
        selected = labels != -100
        logits, targets = mlm_logits(model, batch, selected), labels[selected]
    else:  # clm: position t predicts token t+1
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits[:, :-1]
        targets = labels[:, 1:]
        keep = targets != -100
        logits, targets = logits[keep], targets[keep]
    logits = logits.float()
    loss = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.argmax(-1) == targets).sum()
    return loss, torch.tensor(targets.numel()), correct


def model_inputs(batch: Batch) -> Batch:
    """Drop an all-ones attention mask: packed blocks need none, and without it SDPA takes its fast path."""
    if "attention_mask" in batch and bool(batch["attention_mask"].all()):
        return {k: v for k, v in batch.items() if k != "attention_mask"}
    return batch
