"""Tests for pdx_tf.evaluation.metrics: sklearn agreement, hand-computed values, undefined cases."""

import math

import numpy as np
import pytest
from sklearn import metrics as sklearn_metrics

from pdx_tf.evaluation import metrics


def _sklearn_reference(labels, probabilities, threshold):
  predicted = (probabilities >= threshold).astype(int)
  return {
      "sensitivity": sklearn_metrics.recall_score(labels, predicted, zero_division=np.nan),
      "specificity": sklearn_metrics.recall_score(labels, predicted, pos_label=0, zero_division=np.nan),
      "accuracy": sklearn_metrics.accuracy_score(labels, predicted),
      "balanced_accuracy": sklearn_metrics.balanced_accuracy_score(labels, predicted),
      "ppv": sklearn_metrics.precision_score(labels, predicted, zero_division=np.nan),
      "npv": sklearn_metrics.precision_score(labels, predicted, pos_label=0, zero_division=np.nan),
      "f1": sklearn_metrics.f1_score(labels, predicted, zero_division=np.nan),
      "auc": sklearn_metrics.roc_auc_score(labels, probabilities),
      "brier": sklearn_metrics.brier_score_loss(labels, probabilities),
  }


@pytest.mark.parametrize("trial", range(40))
def test_every_metric_matches_sklearn_on_random_predictions(trial):
  rng = np.random.default_rng([7, trial])
  size = int(rng.integers(4, 80))
  labels = rng.integers(0, 2, size)
  labels[:2] = [0, 1]  # both classes, so every metric is defined in sklearn
  # Rounding creates ties, which exercises the AUC tie rule.
  probabilities = np.round(rng.random(size), int(rng.integers(1, 4)))
  threshold = float(rng.choice([0.5, 0.3, 0.72]))
  ours = metrics.binary_metrics(labels, probabilities, threshold)
  reference = _sklearn_reference(labels, probabilities, threshold)
  assert set(ours) == set(metrics.METRIC_NAMES)
  for name in metrics.METRIC_NAMES:
    if math.isnan(reference[name]):
      assert math.isnan(ours[name]), name
    else:
      assert ours[name] == pytest.approx(reference[name], abs=1e-12), name


def test_hand_computed_values():
  # Positives 0.9 0.8 0.6 0.3, negatives 0.7 0.2 0.1; threshold 0.5 -> TP 3, FN 1, FP 1, TN 2.
  labels = [1, 1, 1, 1, 0, 0, 0]
  probabilities = [0.9, 0.8, 0.6, 0.3, 0.7, 0.2, 0.1]
  counts = metrics.confusion_counts(labels, probabilities, 0.5)
  assert counts == metrics.ConfusionCounts(true_positive=3, false_positive=1, true_negative=2, false_negative=1)
  values = metrics.binary_metrics(labels, probabilities, 0.5)
  assert values["sensitivity"] == 0.75
  assert values["specificity"] == pytest.approx(2 / 3)
  assert values["accuracy"] == pytest.approx(5 / 7)
  assert values["balanced_accuracy"] == pytest.approx((0.75 + 2 / 3) / 2)
  assert values["ppv"] == 0.75
  assert values["npv"] == pytest.approx(2 / 3)
  assert values["f1"] == pytest.approx(6 / 8)
  # Pairs (positive > negative): 0.9 and 0.8 beat all 3, 0.6 and 0.3 beat 2 -> 10 of 12.
  assert values["auc"] == pytest.approx(10 / 12)
  squared = [0.1**2, 0.2**2, 0.4**2, 0.7**2, 0.7**2, 0.2**2, 0.1**2]
  assert values["brier"] == pytest.approx(sum(squared) / 7)


def test_threshold_is_inclusive():
  values = metrics.binary_metrics([1, 0], [0.5, 0.49], threshold=0.5)
  assert values["sensitivity"] == 1.0 and values["specificity"] == 1.0


def test_ties_count_one_half_in_auc():
  assert metrics.binary_metrics([1, 0], [0.4, 0.4])["auc"] == 0.5
  assert metrics.binary_metrics([1, 1, 0, 0], [0.4, 0.9, 0.4, 0.1])["auc"] == pytest.approx((1 + 0.5 + 1 + 1) / 4)


def test_undefined_metrics_are_nan():
  only_negatives = metrics.binary_metrics([0, 0, 0], [0.1, 0.6, 0.2])
  for name in ("sensitivity", "balanced_accuracy", "auc"):
    assert math.isnan(only_negatives[name]), name
  assert only_negatives["specificity"] == pytest.approx(2 / 3)
  assert only_negatives["ppv"] == 0.0  # one false positive, no true positive: defined and zero
  assert only_negatives["f1"] == 0.0
  nothing_predicted_positive = metrics.binary_metrics([0, 0], [0.1, 0.2])
  assert math.isnan(nothing_predicted_positive["ppv"])
  assert math.isnan(nothing_predicted_positive["f1"])  # no positives and no positive predictions
  assert nothing_predicted_positive["npv"] == 1.0
  everything_positive = metrics.binary_metrics([1, 1], [0.9, 0.8])
  assert math.isnan(everything_positive["npv"]) and math.isnan(everything_positive["specificity"])


def test_weighted_rows_equal_repeating_examples():
  labels = np.array([1, 0, 1, 0, 1])
  probabilities = np.array([0.8, 0.3, 0.4, 0.6, 0.6])
  counts = np.array([[2, 0, 1, 3, 1], [1, 1, 1, 1, 1]])
  weighted = metrics.weighted_metrics(labels, probabilities, counts)
  for row, row_counts in enumerate(counts):
    expanded = metrics.binary_metrics(np.repeat(labels, row_counts), np.repeat(probabilities, row_counts))
    for name in metrics.METRIC_NAMES:
      np.testing.assert_allclose(weighted[name][row], expanded[name], err_msg=name)


def test_roc_curve_matches_sklearn():
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 2, 50)
  probabilities = np.round(rng.random(50), 1)
  fpr, tpr, thresholds = metrics.roc_curve(labels, probabilities)
  sk_fpr, sk_tpr, sk_thresholds = sklearn_metrics.roc_curve(labels, probabilities, drop_intermediate=False)
  np.testing.assert_allclose(fpr, sk_fpr)
  np.testing.assert_allclose(tpr, sk_tpr)
  np.testing.assert_allclose(thresholds[1:], sk_thresholds[1:])


def test_youden_threshold_by_hand():
  # At 0.6: sensitivity 3/4, specificity 2/3 (J 0.4167); at 0.8: 2/4 and 1 (J 0.5); at 0.3: 1 and 2/3 (J 0.667).
  point = metrics.youden_threshold([1, 1, 1, 1, 0, 0, 0], [0.9, 0.8, 0.6, 0.3, 0.7, 0.2, 0.1])
  assert point.threshold == 0.3
  assert point.sensitivity == 1.0
  assert point.specificity == pytest.approx(2 / 3)
  assert point.youden_index == pytest.approx(2 / 3)
  assert math.isnan(metrics.youden_threshold([1, 1], [0.2, 0.3]).threshold)


def test_calibration_bins_by_hand():
  rows = metrics.calibration_bins([0, 1, 1, 0, 1], [0.05, 0.15, 0.12, 0.95, 1.0], num_bins=10)
  assert [(row["bin_low"], row["count"]) for row in rows] == [(0.0, 1), (0.1, 2), (0.9, 2)]
  assert rows[1]["observed_fraction"] == 1.0
  assert rows[1]["mean_probability"] == pytest.approx(0.135)
  assert rows[2]["observed_fraction"] == 0.5


def test_pr_curve_counts_by_hand():
  # Thresholds 0, 0.5, 1: at 0.5 the scores 0.9 (pos) and 0.6 (neg) count as predicted positive.
  curve = metrics.pr_curve_counts([1, 0, 1, 0], [0.9, 0.6, 0.2, 0.1], num_thresholds=3)
  assert curve.shape == (6, 3)
  np.testing.assert_allclose(curve[0], [2, 1, 0])  # TP
  np.testing.assert_allclose(curve[1], [2, 1, 0])  # FP
  np.testing.assert_allclose(curve[2], [0, 1, 2])  # TN
  np.testing.assert_allclose(curve[3], [0, 1, 2])  # FN
  np.testing.assert_allclose(curve[4], [0.5, 0.5, 0.0])  # precision
  np.testing.assert_allclose(curve[5], [1.0, 0.5, 0.0])  # recall


def test_bad_shapes_and_labels_are_rejected():
  with pytest.raises(ValueError):
    metrics.binary_metrics([1, 0], [0.5])
  with pytest.raises(ValueError):
    metrics.binary_metrics([1, 2], [0.5, 0.5])
