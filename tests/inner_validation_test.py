"""Tests of the inner split (pdx_tf.training.splits.inner_split) and pdx_tf.training.calibration.

The inner patients are checked like the fold split's leakage test: a subset of each cell's training patients,
never a test patient, disjoint from the fit patients, stratified and deterministic. Platt scaling and PAV are
compared with scikit-learn, the Youden threshold with a brute-force search written here.
"""

import fractions
import itertools

import numpy as np
import pytest
from sklearn import isotonic as sklearn_isotonic
from sklearn import linear_model as sklearn_linear_model

from pdx_tf.errors import RunsError
from pdx_tf.training import calibration, splits


def _labels(num_positive, num_negative):
  labels = {f"pos{index:02d}": 1 for index in range(num_positive)}
  labels.update({f"neg{index:02d}": 0 for index in range(num_negative)})
  return labels


@pytest.mark.parametrize("num_positive,num_negative,num_folds,fraction",
                         [(13, 30, 8, 0.2), (10, 10, 4, 0.25), (20, 20, 8, 0.5), (9, 21, 3, 0.3)])
def test_inner_patients_are_training_patients_only_stratified_and_deterministic(num_positive, num_negative,
                                                                                num_folds, fraction):
  labels = _labels(num_positive, num_negative)
  split = splits.make_splits(labels, task="p", num_folds=num_folds, num_repeats=2, seed=3, repartition=True)
  draws = set()
  for repeat_entry in split["repeats"]:
    for fold_entry in repeat_entry["folds"]:
      train, test = fold_entry["train"], fold_entry["test"]
      keys = dict(seed=3, repeat=repeat_entry["repeat"], fold=fold_entry["fold"], fraction=fraction)
      fit, inner = splits.inner_split(labels, train, **keys)
      assert set(inner) <= set(train) and not set(inner) & set(test), "an inner patient outside the training set"
      assert not set(inner) & set(fit) and set(inner) | set(fit) == set(train)
      assert fit == sorted(fit) and inner == sorted(inner)
      for label in (0, 1):  # per class: round-half-up of fraction x the class's training patients
        in_train = sum(labels[patient] == label for patient in train)
        assert sum(labels[patient] == label for patient in inner) == int(np.floor(fraction * in_train + 0.5))
      # Deterministic: the same inputs (in any order, with any labels of other patients) give the same draw.
      assert splits.inner_split(dict(reversed(labels.items())), list(reversed(train)), **keys) == (fit, inner)
      draws.add(tuple(inner))
  assert len(draws) > 1, "the draw must depend on (repeat, fold)"


def test_inner_draw_depends_on_the_seed_and_zero_keeps_everyone():
  labels = _labels(10, 10)
  train = sorted(labels)
  draws = {tuple(splits.inner_split(labels, train, seed=seed, repeat=0, fold=0, fraction=0.3)[1])
           for seed in range(6)}
  assert len(draws) > 1
  assert splits.inner_split(labels, train, seed=0, repeat=0, fold=0, fraction=0.0) == (train, [])


@pytest.mark.parametrize("fraction,side", [(0.1, "inner"), (0.9, "fit")])
def test_fraction_that_leaves_one_class_is_one_line(fraction, side):
  labels = _labels(3, 3)
  with pytest.raises(RunsError) as error:
    splits.inner_split(labels, sorted(labels), seed=0, repeat=1, fold=2, fraction=fraction)
  message = str(error.value)
  assert "\n" not in message and "r01_f02" in message and f"the {side} patients" in message
  assert "--inner_fraction" in message
  with pytest.raises(ValueError):
    splits.inner_split(labels, sorted(labels), seed=0, repeat=0, fold=0, fraction=1.0)


# ------------------------------------------------------------------------------------------------- threshold


def youden_index(labels, probabilities, threshold):
  """TPR - FPR of `p >= threshold`, as an exact fraction."""
  labels = np.asarray(labels).astype(bool)
  predicted = np.asarray(probabilities) >= threshold
  return (fractions.Fraction(int(predicted[labels].sum()), int(labels.sum()))
          - fractions.Fraction(int(predicted[~labels].sum()), int((~labels).sum())))


def brute_force_best_index(labels, probabilities):
  """The largest Youden index over every observed score as the threshold."""
  return max(youden_index(labels, probabilities, threshold) for threshold in set(probabilities))


def test_inner_youden_threshold_equals_a_brute_force_search():
  rng = np.random.default_rng(4)
  for _ in range(20):
    labels = rng.integers(0, 2, 15)
    labels[:2] = (0, 1)
    probabilities = np.round(np.clip(rng.normal(0.4 + 0.2 * labels, 0.2), 0, 1), 2)
    threshold = calibration.operating_threshold("inner_youden", None, labels, probabilities)
    # Equal indices are a tie (the library breaks them in floating point), so the index is what must match.
    assert threshold in set(probabilities.tolist())
    assert youden_index(labels, probabilities, threshold) == brute_force_best_index(labels, probabilities)
  assert calibration.operating_threshold("fixed", 0.3, [0, 1], [0.2, 0.9]) == 0.3
  with pytest.raises(ValueError):
    calibration.operating_threshold("inner_youden", None, [1, 1], [0.2, 0.9])


def test_parse_threshold():
  assert calibration.parse_threshold("0.5") == ("fixed", 0.5)
  assert calibration.parse_threshold("inner_youden") == ("inner_youden", None)
  for bad in ("youden", "1.0", "0", "-0.2", "nan"):
    with pytest.raises(ValueError):
      calibration.parse_threshold(bad)


# ----------------------------------------------------------------------------------------------- calibration


def _platt_by_sklearn(labels, probabilities):
  """Platt's smoothed targets as sample weights of duplicated rows, fitted by unpenalised LogisticRegression."""
  labels = np.asarray(labels)
  positives, negatives = labels.sum(), labels.size - labels.sum()
  targets = np.where(labels == 1, (positives + 1) / (positives + 2), 1 / (negatives + 2))
  features = calibration.logit(probabilities)[:, None]
  model = sklearn_linear_model.LogisticRegression(C=np.inf, tol=1e-12, max_iter=10000)
  model.fit(np.vstack([features, features]), np.r_[np.ones(labels.size), np.zeros(labels.size)],
            sample_weight=np.r_[targets, 1 - targets])
  return float(model.coef_[0, 0]), float(model.intercept_[0])


@pytest.mark.parametrize("seed", range(4))
def test_platt_equals_sklearn_logistic_regression(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, 30)
  probabilities = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0.001, 0.999)
  fitted = calibration.fit_platt(labels, probabilities)
  slope, intercept = _platt_by_sklearn(labels, probabilities)
  assert fitted["slope"] == pytest.approx(slope, abs=1e-4) and fitted["intercept"] == pytest.approx(intercept, abs=1e-4)
  expected = 1 / (1 + np.exp(-(slope * calibration.logit(probabilities) + intercept)))
  np.testing.assert_allclose(calibration.apply_calibration(fitted, probabilities), expected, atol=1e-5)


def test_platt_is_finite_on_a_separated_inner_set():
  fitted = calibration.fit_platt([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
  slope, intercept = _platt_by_sklearn([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
  assert np.isfinite(fitted["slope"]) and fitted["slope"] == pytest.approx(slope, abs=1e-4)
  assert fitted["intercept"] == pytest.approx(intercept, abs=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_pav_equals_sklearn_isotonic_regression(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, 25)
  probabilities = np.round(rng.uniform(0, 1, 25), 1)  # rounding makes ties
  fitted = calibration.fit_isotonic(labels, probabilities)
  reference = sklearn_isotonic.IsotonicRegression(out_of_bounds="clip").fit(probabilities, labels)
  queries = np.r_[np.linspace(-0.1, 1.1, 61), probabilities]
  np.testing.assert_allclose(calibration.apply_calibration(fitted, queries), reference.predict(queries), atol=1e-12)
  assert all(a <= b for a, b in itertools.pairwise(fitted["y"])), "isotonic means non-decreasing"


def test_platt_of_one_repeated_probability_is_the_smoothed_base_rate():
  fitted = calibration.fit_platt([0, 1, 1], [0.3, 0.3, 0.3])
  assert fitted["slope"] == 0.0
  np.testing.assert_allclose(calibration.apply_calibration(fitted, [0.1, 0.3, 0.9]), (1 / 3 + 2 * 3 / 4) / 3)


def test_platt_of_probabilities_equal_up_to_float32_noise_is_the_smoothed_base_rate():
  # A collapsed float32 model: its patients' probabilities differ in the 7th digit, which a fitted slope would
  # blow up into a ranking (slopes of 1e6 and more).
  noisy = np.float32(0.3) + np.asarray([0.0, 6e-8, -6e-8, 1.2e-7], np.float32)
  assert len(set(noisy.tolist())) > 1
  fitted = calibration.fit_platt([0, 1, 1, 0], noisy.astype(np.float64))
  assert fitted["slope"] == 0.0
  smoothed_mean = (2 * (1 / 4) + 2 * (3 / 4)) / 4  # negatives' target 1/(2+2), positives' (2+1)/(2+2)
  assert fitted["intercept"] == pytest.approx(np.log(smoothed_mean / (1 - smoothed_mean)), abs=1e-12)
  # A spread a model means to make (1e-3) is fitted, as scikit-learn does.
  spread = [0.3, 0.301, 0.302, 0.3005]
  slope, intercept = _platt_by_sklearn([0, 1, 1, 0], spread)
  assert calibration.fit_platt([0, 1, 1, 0], spread)["slope"] == pytest.approx(slope, rel=1e-3)


def test_fit_calibration_dispatch():
  assert calibration.fit_calibration("none", [0, 1], [0.1, 0.9]) is None
  assert calibration.fit_calibration("platt", [0, 1], [0.1, 0.9])["method"] == "platt"
  with pytest.raises(ValueError):
    calibration.fit_calibration("beta", [0, 1], [0.1, 0.9])
