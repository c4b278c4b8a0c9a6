"""Binary classification metrics with explicit NaN for undefined values, vectorised over bootstrap weights.

Every metric is computed from per-example weights, so the same code serves a plain evaluation (one row of
ones) and a patient bootstrap (one row of resampling counts per replicate). Definitions, with a prediction
counted positive when `probability >= threshold`:

  sensitivity        TP / (TP + FN)             NaN without positives
  specificity        TN / (TN + FP)             NaN without negatives
  accuracy           (TP + TN) / N              NaN without examples
  balanced_accuracy  (sensitivity + specificity) / 2, NaN unless both classes are present
  ppv                TP / (TP + FP)             NaN when nothing is predicted positive
  npv                TN / (TN + FN)             NaN when nothing is predicted negative
  f1                 2 TP / (2 TP + FP + FN)    NaN without positives and positive predictions
  auc                ROC AUC (Mann-Whitney, ties count one half), NaN unless both classes are present
  brier              mean (probability - label)^2, NaN without examples

NaN (rather than sklearn's 0 with a warning) keeps an undefined value from pulling a mean down; aggregation
drops NaNs and reports how many values were defined.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Shared with training (pdx_tf/metrics.py, the core): the AUC, the ROC curve and the Youden rule.
from pdx_tf.metrics import (  # noqa: F401  pylint: disable=unused-import  (re-exported: YoudenPoint, roc_curve)
    YoudenPoint, roc_curve, youden_threshold)
from pdx_tf.metrics import as_label_arrays as _as_arrays, safe_divide as _safe_divide, weighted_auc as _weighted_auc

METRIC_NAMES = (
    "sensitivity",
    "specificity",
    "accuracy",
    "balanced_accuracy",
    "ppv",
    "npv",
    "f1",
    "auc",
    "brier",
)


def weighted_metrics(labels, probabilities, weights, threshold: float = 0.5) -> dict[str, np.ndarray]:
  """All metrics for each row of example weights.

  Args:
    labels: [N] 0/1 labels.
    probabilities: [N] predicted probabilities of the positive class.
    weights: [B, N] non-negative weights (e.g. bootstrap counts); a row of ones is the plain metric.
    threshold: a probability at or above it is a positive prediction.

  Returns:
    Metric name -> [B] float64 array, NaN where the metric is undefined for that row.
  """
  positive, probabilities = _as_arrays(labels, probabilities)
  weights = np.asarray(weights, dtype=np.float64)
  if weights.ndim != 2 or weights.shape[1] != positive.size:
    raise ValueError(f"weights must have shape [B, {positive.size}], got {weights.shape}")
  predicted = probabilities >= threshold
  true_positive = weights @ (positive & predicted)
  false_negative = weights @ (positive & ~predicted)
  false_positive = weights @ (~positive & predicted)
  true_negative = weights @ (~positive & ~predicted)
  total = true_positive + false_negative + false_positive + true_negative
  sensitivity = _safe_divide(true_positive, true_positive + false_negative)
  specificity = _safe_divide(true_negative, true_negative + false_positive)
  squared_error = (probabilities - positive) ** 2
  return {
      "sensitivity": sensitivity,
      "specificity": specificity,
      "accuracy": _safe_divide(true_positive + true_negative, total),
      # NaN + x is NaN, so a missing class leaves balanced accuracy undefined, as documented.
      "balanced_accuracy": (sensitivity + specificity) / 2.0,
      "ppv": _safe_divide(true_positive, true_positive + false_positive),
      "npv": _safe_divide(true_negative, true_negative + false_negative),
      "f1": _safe_divide(2.0 * true_positive, 2.0 * true_positive + false_positive + false_negative),
      "auc": _weighted_auc(positive, probabilities, weights),
      "brier": _safe_divide(weights @ squared_error, total),
  }


def binary_metrics(labels, probabilities, threshold: float = 0.5) -> dict[str, float]:
  """All metrics (see the module docstring) for one set of predictions; undefined ones are NaN."""
  labels_array, _ = _as_arrays(labels, probabilities)
  ones = np.ones((1, labels_array.size))
  return {name: float(values[0]) for name, values in weighted_metrics(labels, probabilities, ones, threshold).items()}


@dataclasses.dataclass(frozen=True)
class ConfusionCounts:
  true_positive: int
  false_positive: int
  true_negative: int
  false_negative: int


def confusion_counts(labels, probabilities, threshold: float = 0.5) -> ConfusionCounts:
  """TP/FP/TN/FN with `probability >= threshold` as the positive decision."""
  positive, probabilities = _as_arrays(labels, probabilities)
  predicted = probabilities >= threshold
  return ConfusionCounts(
      true_positive=int(np.sum(positive & predicted)),
      false_positive=int(np.sum(~positive & predicted)),
      true_negative=int(np.sum(~positive & ~predicted)),
      false_negative=int(np.sum(positive & ~predicted)),
  )


def calibration_bins(labels, probabilities, num_bins: int = 10) -> list[dict[str, float]]:
  """Reliability diagram data: equal-width probability bins [k/n, (k+1)/n), the last one closed.

  Returns one dict per non-empty bin: bin_low, bin_high, count, mean_probability, observed_fraction.
  """
  positive, probabilities = _as_arrays(labels, probabilities)
  index = np.minimum((probabilities * num_bins).astype(int), num_bins - 1)
  rows = []
  for bin_index in range(num_bins):
    members = index == bin_index
    if not members.any():
      continue
    rows.append({
        "bin_low": bin_index / num_bins,
        "bin_high": (bin_index + 1) / num_bins,
        "count": int(members.sum()),
        "mean_probability": float(probabilities[members].mean()),
        "observed_fraction": float(positive[members].mean()),
    })
  return rows


def pr_curve_counts(labels, probabilities, num_thresholds: int) -> np.ndarray:
  """TensorBoard's pr_curves tensor: [6, num_thresholds] rows TP, FP, TN, FN, precision, recall.

  Thresholds are evenly spaced in [0, 1]; an example counts at every threshold <= its score, bucketed as
  tensorboard.plugins.pr_curve.summary.pb does (so the plugin draws the same curve).
  """
  positive, probabilities = _as_arrays(labels, probabilities)
  bucket = np.floor(probabilities * (num_thresholds - 1)).astype(np.int64)
  positive_buckets = np.bincount(bucket[positive], minlength=num_thresholds).astype(np.float64)
  negative_buckets = np.bincount(bucket[~positive], minlength=num_thresholds).astype(np.float64)
  true_positive = np.cumsum(positive_buckets[::-1])[::-1]
  false_positive = np.cumsum(negative_buckets[::-1])[::-1]
  false_negative = true_positive[0] - true_positive
  true_negative = false_positive[0] - false_positive
  minimum_count = 1e-7  # the plugin's guard against 0/0
  precision = true_positive / np.maximum(minimum_count, true_positive + false_positive)
  recall = true_positive / np.maximum(minimum_count, true_positive + false_negative)
  return np.stack([true_positive, false_positive, true_negative, false_negative, precision, recall]).astype(
      np.float32)
