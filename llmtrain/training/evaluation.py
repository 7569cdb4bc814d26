"""The validation pass: token-weighted loss, perplexity and accuracy (accuracy and macro-F1 for classifiers)."""
from __future__ import annotations

import functools
import math

import torch

from llmtrain.runtime import distributed
from llmtrain.training import metrics
from llmtrain.data.module import DataModule
from llmtrain.runtime.hardware import Hardware
from llmtrain.training.losses import loss_terms, model_inputs


class Evaluator:
    """evaluate() over this rank's share of the validation set, summed over all ranks before any mean is taken."""

    def __init__(self, data: DataModule, hardware: Hardware, batch_size: int, max_batches: int | None):
        self.data, self.hw, self.task = data, hardware, data.task
        self.batch_size, self.max_batches = batch_size, max_batches
        self.rank, self.world = distributed.rank(), distributed.world_size()

    @functools.cached_property
    def metric(self):
        """Loaded at the first evaluation: importing `evaluate` takes seconds the first training step need not wait."""
        return metrics.load("classification" if self.task == "cls" else "lm_metrics")

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64)
        preds: list[int] = []
        refs: list[int] = []
        for batch in self.data.eval_batches(self.batch_size, self.max_batches, self.rank, self.world):
            batch = {k: v.to(self.hw.torch_device) for k, v in model_inputs(batch).items()}
            with self.hw.autocast():
                if self.task == "cls":
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits.float()
                    loss_sum = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")
                    preds += logits.argmax(-1).tolist()
                    refs += batch["labels"].tolist()
                    n, correct = batch["labels"].numel(), (logits.argmax(-1) == batch["labels"]).sum()
                else:
                    loss_sum, n, correct = loss_terms(model, batch, self.task)
            totals += torch.tensor([float(loss_sum), float(n), float(correct)], dtype=torch.float64)
        totals = distributed.all_reduce_sum(totals, self.hw.torch_device)
        model.train()
        return self._classification(totals, preds, refs) if self.task == "cls" else self._language_model(totals)

    def _classification(self, totals: torch.Tensor, preds: list[int], refs: list[int]) -> dict[str, float]:
        preds, refs = distributed.gather(preds), distributed.gather(refs)  # every rank's share of the examples
        self.metric.add_batch(predictions=preds, references=refs)
        out = self.metric.compute()
        loss = float(totals[0] / totals[1])
        return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "accuracy": out["accuracy"],
                "macro_f1": out["macro_f1"]}

    def _language_model(self, totals: torch.Tensor) -> dict[str, float]:
        self.metric.add_batch(loss_sum=[float(totals[0])], n_tokens=[int(totals[1])], n_correct=[int(totals[2])])
        out = self.metric.compute()
        result = {"loss": out["loss"], "perplexity": out["perplexity"], "accuracy": out["accuracy"]}
        words = self.data.info.get("validation_words")
        if self.task == "clm" and words and self.max_batches is None:
            result["nll_per_word"] = out["loss"] * self.data.info["validation_tokens"] / words
        return result
