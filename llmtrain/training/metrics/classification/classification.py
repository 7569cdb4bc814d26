"""Classification metrics: accuracy and macro-F1 over integer class ids, without scikit-learn."""
import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy and macro-averaged F1 (mean of per-class F1 over classes present in labels or predictions)."
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class ids.
    references: true class ids.
Returns:
    accuracy, macro_f1.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Classification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        pred, ref = np.asarray(predictions), np.asarray(references)
        if len(ref) == 0:
            return {"accuracy": float("nan"), "macro_f1": float("nan")}
        f1s = []
        for c in np.union1d(pred, ref):
            tp = np.sum((pred == c) & (ref == c))
            fp = np.sum((pred == c) & (ref != c))
            fn = np.sum((pred != c) & (ref == c))
            f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        return {"accuracy": float(np.mean(pred == ref)), "macro_f1": float(np.mean(f1s))}
