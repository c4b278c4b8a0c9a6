"""Tests of pdx_tf/conformal.py against a plain re-implementation of the documented rule."""

import math

import numpy as np
import pytest

from pdx_tf import conformal


def _reference_bound(class_scores, alpha):
  """The documented rule, written out: k = ceil((n+1)(1-alpha)); the k-th smallest score, infinite if k > n."""
  ordered = sorted(float(score) for score in class_scores)
  n = len(ordered)
  k = 0
  while k < (n + 1) * (1 - alpha) - 1e-9:  # the smallest integer >= (n+1)(1-alpha)
    k += 1
  return ordered[k - 1] if k <= n else math.inf


def _reference_sets(probabilities, calibration_probabilities, calibration_labels, alpha):
  """Each patient's set as (negative in, positive in) by the documented rule, with loops."""
  negative_scores = [p for p, y in zip(calibration_probabilities, calibration_labels) if y == 0]
  positive_scores = [1 - p for p, y in zip(calibration_probabilities, calibration_labels) if y == 1]
  q0, q1 = _reference_bound(negative_scores, alpha), _reference_bound(positive_scores, alpha)
  return [(p <= q0, 1 - p <= q1) for p in probabilities]


def test_hand_computed_quantile():
  # n = 9, alpha 0.1: k = ceil(10 * 0.9) = 9, the 9th smallest; alpha 0.2: k = 8.
  scores = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
  assert conformal.class_quantile(scores, 0.1) == 0.8
  assert conformal.class_quantile(scores, 0.2) == 0.7
  # n = 8 at alpha 0.1: k = ceil(8.1) = 9 > 8: infinite.
  assert conformal.class_quantile(scores[:8], 0.1) == math.inf
  assert conformal.quantile_index(9, 0.1) == 9 and conformal.quantile_index(19, 0.1) == 18


def test_thresholds_and_sets_match_the_reference_on_random_data():
  rng = np.random.default_rng(0)
  for _ in range(200):
    n = int(rng.integers(1, 60))
    alpha = float(rng.choice([0.05, 0.1, 0.2, 0.3]))
    labels = rng.integers(0, 2, n)
    probabilities = np.round(rng.uniform(0, 1, n), 2)  # rounding makes ties
    test = np.round(rng.uniform(0, 1, 30), 2)
    thresholds = conformal.fit_thresholds(probabilities, labels, alpha)
    negative, positive = conformal.prediction_sets(test, thresholds)
    expected = _reference_sets(test, probabilities, labels, alpha)
    assert list(zip(negative.tolist(), positive.tolist())) == expected
    # The p-value form agrees with the quantile form.
    p_negative, p_positive = conformal.p_values(test, probabilities, labels)
    assert (p_negative > alpha).tolist() == negative.tolist()
    assert (p_positive > alpha).tolist() == positive.tolist()


def test_answers_and_empty_sets():
  negative = np.array([True, False, True, False])
  positive = np.array([False, True, True, False])
  assert conformal.answers(negative, positive).tolist() == ["negative", "positive", "uncertain", "uncertain"]
  assert conformal.is_empty(negative, positive).tolist() == [False, False, False, True]
  assert conformal.set_names(negative, positive) == ["negative", "positive", "both", "empty"]


def test_too_few_calibration_patients_puts_the_class_in_every_set():
  thresholds = conformal.fit_thresholds([0.1, 0.2, 0.9], [0, 0, 1], 0.1)
  assert thresholds.negative_max_score == 1.0 and thresholds.positive_max_score == 1.0
  negative, positive = conformal.prediction_sets([0.0, 0.5, 1.0], thresholds)
  assert negative.all() and positive.all()


def test_thresholds_round_trip_and_refuse_bad_alpha():
  thresholds = conformal.fit_thresholds([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1], 0.5)
  assert conformal.ConformalThresholds.from_dict(thresholds.to_dict()) == thresholds
  for bad in (0.0, 1.0, -0.1, float("nan"), True):
    with pytest.raises(ValueError, match="error rate"):
      conformal.check_alpha(bad)


def _grid_rows(rng, num_patients=40, num_folds=8, num_repeats=2):
  """Synthetic out-of-fold rows: each repeat partitions the patients into folds."""
  labels_by_patient = rng.integers(0, 2, num_patients)
  repeats, folds, patients, labels, probabilities = [], [], [], [], []
  for repeat in range(num_repeats):
    order = rng.permutation(num_patients)
    for position, patient in enumerate(order):
      repeats.append(repeat)
      folds.append(position % num_folds)
      patients.append(f"P{patient:03d}")
      labels.append(int(labels_by_patient[patient]))
      probabilities.append(float(np.clip(0.5 + 0.3 * (labels_by_patient[patient] - 0.5) + rng.normal(0, 0.2), 0, 1)))
  return repeats, folds, patients, labels, probabilities


def test_cross_conformal_never_calibrates_a_fold_on_its_own_test_patients():
  rng = np.random.default_rng(1)
  repeats, folds, patients, labels, probabilities = _grid_rows(rng)
  result = conformal.cross_conformal(repeats, folds, patients, labels, probabilities, 0.1)
  patients = np.asarray(patients)
  for (repeat, fold), rows in result.calibration_rows.items():
    own_patients = {patients[i] for i in range(len(patients)) if repeats[i] == repeat and folds[i] == fold}
    assert rows.size > 0
    assert not own_patients & set(patients[rows].tolist())  # no score of a test-fold patient
    assert all(repeats[i] == repeat and folds[i] != fold for i in rows)


def test_cross_conformal_sets_match_the_reference():
  rng = np.random.default_rng(2)
  repeats, folds, patients, labels, probabilities = _grid_rows(rng)
  result = conformal.cross_conformal(repeats, folds, patients, labels, probabilities, 0.2)
  for i in range(len(labels)):
    calibration = [j for j in range(len(labels))
                   if repeats[j] == repeats[i] and folds[j] != folds[i]
                   and patients[j] not in {patients[k] for k in range(len(labels))
                                           if repeats[k] == repeats[i] and folds[k] == folds[i]}]
    expected = _reference_sets([probabilities[i]], [probabilities[j] for j in calibration],
                               [labels[j] for j in calibration], 0.2)[0]
    assert (bool(result.has_negative[i]), bool(result.has_positive[i])) == expected


@pytest.mark.parametrize("alpha", [0.1, 0.2])
def test_per_class_coverage_on_a_known_distribution(alpha):
  """Over many draws from a fixed distribution (positives' P ~ Beta(4, 2), negatives' ~ Beta(2, 4), 30 % positive),
  the split-conformal sets cover each class with mean probability within 0.02 of 1 - alpha (the finite-sample
  guarantee: between 1 - alpha and 1 - alpha + 1/(n_y + 1))."""
  rng = np.random.default_rng(3)
  covered = {0: [], 1: []}
  for _ in range(400):
    labels = (rng.uniform(size=300) < 0.3).astype(int)
    probabilities = np.where(labels == 1, rng.beta(4, 2, labels.size), rng.beta(2, 4, labels.size))
    test_labels = (rng.uniform(size=200) < 0.3).astype(int)
    test = np.where(test_labels == 1, rng.beta(4, 2, test_labels.size), rng.beta(2, 4, test_labels.size))
    negative, positive = conformal.prediction_sets(test, conformal.fit_thresholds(probabilities, labels, alpha))
    for label, contains in ((0, negative), (1, positive)):
      covered[label].append(np.mean(contains[test_labels == label]))
  for label in (0, 1):
    assert abs(np.mean(covered[label]) - (1 - alpha)) < 0.02, (label, np.mean(covered[label]))


def test_a_patient_listed_in_two_folds_never_calibrates_itself():
  # Patient A is in folds 0 and 1 of repeat 0 (a malformed grid): fold 0 must not calibrate on A's fold-1 row.
  calibration = conformal.calibration_rows([0, 0, 0, 0, 0], [0, 0, 1, 1, 2], ["A", "B", "A", "C", "D"])
  assert calibration[(0, 0)].tolist() == [3, 4]
  assert calibration[(0, 1)].tolist() == [1, 4]
  assert calibration[(0, 2)].tolist() == [0, 1, 2, 3]
