"""Metrics that training and evaluation share: the ROC AUC and the Youden threshold rule.

Training reports a cell's AUC and picks an inner-patient threshold (pdx_tf/training); evaluation computes the same
quantities over the grid (pdx_tf/evaluation/metrics.py, which imports these). They live here, in the core, so the
training stage never imports the evaluation stage and both read one definition.

  auc       ROC AUC (Mann-Whitney, ties count one half), NaN unless both classes are present
  youden    the observed score maximising sensitivity + specificity - 1; ties go to the highest threshold
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse


def as_label_arrays(labels, probabilities) -> tuple[np.ndarray, np.ndarray]:
  """(labels as bool [N], probabilities as float64 [N]); ValueError unless both are 1-D of one length, labels 0/1."""
  labels = np.asarray(labels)
  probabilities = np.asarray(probabilities, dtype=np.float64)
  if labels.shape != probabilities.shape or labels.ndim != 1:
    raise ValueError(
        f"labels {labels.shape} and probabilities {probabilities.shape} must be 1-D arrays of one length")
  if labels.size and not np.all((labels == 0) | (labels == 1)):
    raise ValueError("labels must be 0 or 1")
  return labels.astype(bool), probabilities


def safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  """numerator / denominator, NaN where the denominator is zero (an undefined metric)."""
  numerator = np.asarray(numerator, dtype=np.float64)
  denominator = np.asarray(denominator, dtype=np.float64)
  result = np.full(np.broadcast(numerator, denominator).shape, np.nan)
  np.divide(numerator, denominator, out=result, where=denominator > 0)
  return result


def weighted_auc(positive: np.ndarray, probabilities: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """Mann-Whitney AUC: P(score of a positive > score of a negative) + 0.5 P(equal), per weight row."""
  if positive.size == 0:
    return np.full(weights.shape[0], np.nan)
  # Group equal scores so ties are handled exactly; a sparse one-hot keeps memory linear in N even for
  # slice-level predictions with thousands of distinct scores.
  distinct_scores, group = np.unique(probabilities, return_inverse=True)
  negative_index = np.flatnonzero(~positive)
  positive_index = np.flatnonzero(positive)
  one_hot_negative = scipy.sparse.csr_matrix(
      (np.ones(negative_index.size), (np.arange(negative_index.size), group[negative_index])),
      shape=(negative_index.size, distinct_scores.size))
  # [B, G] negative weight at each distinct score, computed as (one_hot^T @ weights^T)^T.
  negative_per_group = np.asarray((one_hot_negative.T @ weights[:, negative_index].T).T)
  negative_below = np.cumsum(negative_per_group, axis=1) - negative_per_group
  positive_groups = group[positive_index]
  wins = negative_below[:, positive_groups] + 0.5 * negative_per_group[:, positive_groups]
  numerator = np.sum(weights[:, positive_index] * wins, axis=1)
  pairs = weights[:, positive_index].sum(axis=1) * weights[:, negative_index].sum(axis=1)
  return safe_divide(numerator, pairs)


def auc(labels, probabilities) -> float:
  """ROC AUC of one set of predictions (ties count one half); NaN unless both classes are present."""
  positive, probabilities = as_label_arrays(labels, probabilities)
  return float(weighted_auc(positive, probabilities, np.ones((1, positive.size)))[0])


def roc_curve(labels, probabilities) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(false positive rate, true positive rate, thresholds), one point per distinct score plus (0, 0).

  Thresholds decrease; the first is +inf (nothing predicted positive), as in sklearn with
  drop_intermediate=False. Requires both classes.
  """
  positive, probabilities = as_label_arrays(labels, probabilities)
  if positive.all() or not positive.any():
    raise ValueError("a ROC curve needs both positive and negative examples")
  order = np.argsort(-probabilities, kind="stable")
  sorted_scores = probabilities[order]
  sorted_positive = positive[order]
  # Keep the last index of each run of equal scores so tied examples enter the curve together.
  last_of_run = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
  true_positives = np.cumsum(sorted_positive)[last_of_run]
  false_positives = np.cumsum(~sorted_positive)[last_of_run]
  true_positive_rate = np.r_[0.0, true_positives / positive.sum()]
  false_positive_rate = np.r_[0.0, false_positives / (~positive).sum()]
  thresholds = np.r_[np.inf, sorted_scores[last_of_run]]
  return false_positive_rate, true_positive_rate, thresholds


@dataclasses.dataclass(frozen=True)
class YoudenPoint:
  """The threshold that maximises sensitivity + specificity - 1 (descriptive: chosen on the test data)."""
  threshold: float
  sensitivity: float
  specificity: float
  youden_index: float


def youden_threshold(labels, probabilities) -> YoudenPoint:
  """The Youden-optimal threshold; ties go to the highest threshold (the most specific choice).

  The threshold is an observed score, so `probability >= threshold` reproduces the reported point. Returns
  NaNs without both classes.
  """
  positive, probabilities = as_label_arrays(labels, probabilities)
  if positive.all() or not positive.any():
    return YoudenPoint(np.nan, np.nan, np.nan, np.nan)
  false_positive_rate, true_positive_rate, thresholds = roc_curve(positive.astype(int), probabilities)
  youden = true_positive_rate[1:] - false_positive_rate[1:]  # skip the +inf point
  best = int(np.argmax(youden)) + 1  # argmax takes the first maximum: the highest threshold
  return YoudenPoint(
      threshold=float(thresholds[best]),
      sensitivity=float(true_positive_rate[best]),
      specificity=float(1.0 - false_positive_rate[best]),
      youden_index=float(youden[best - 1]),
  )
