"""Language-model metrics accumulated per batch: token-weighted loss, perplexity and accuracy.

Each batch adds three numbers (summed loss, target tokens, correct predictions), so memory stays
constant however large the eval set, and perplexity is exp of the token-weighted mean loss over
the whole set, never a mean of per-batch means.
"""
import math

import datasets
import evaluate

_DESCRIPTION = "Token-weighted eval loss, perplexity = exp(mean loss over all target tokens), token accuracy."
_KWARGS_DESCRIPTION = """
Args:
    loss_sum: summed cross-entropy (nats) of each batch's target tokens.
    n_tokens: number of target tokens in each batch.
    n_correct: number of target tokens whose argmax prediction is right.
Returns:
    loss, perplexity, accuracy, tokens.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LmMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "loss_sum": datasets.Value("float64"),
                "n_tokens": datasets.Value("int64"),
                "n_correct": datasets.Value("int64"),
            }),
        )

    def _compute(self, loss_sum, n_tokens, n_correct):
        tokens = int(sum(n_tokens))
        if tokens == 0:
            return {"loss": float("nan"), "perplexity": float("nan"), "accuracy": float("nan"), "tokens": 0}
        loss = float(sum(loss_sum)) / tokens
        return {
            "loss": loss,
            "perplexity": math.exp(loss) if loss < 700 else float("inf"),
            "accuracy": int(sum(n_correct)) / tokens,
            "tokens": tokens,
        }
