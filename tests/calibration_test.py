"""calibration.py's scikit-learn fits against the numpy implementations they replaced (Newton iterations for Platt,
pool-adjacent-violators for isotonic), kept here as the independent reference.

Stated tolerance: calibrated probabilities within 1e-6 and Platt parameters within 1e-5 of the Newton optimum
(measured over these 300 inner sets: 2.0e-8 and 2.1e-7 for Platt, 1.1e-16 for isotonic).
"""

import numpy as np
import pytest

from pdx_tf.training import calibration

_EPSILON = 1e-6


def _logit(probabilities):
  clipped = np.clip(np.asarray(probabilities, np.float64), _EPSILON, 1.0 - _EPSILON)
  return np.log(clipped) - np.log1p(-clipped)


def _sigmoid(values):
  return 0.5 * (1.0 + np.tanh(0.5 * values))


def _platt_by_newton(labels, probabilities, max_iterations=100):
  """(slope, intercept): Newton's method with step halving on the smoothed targets' cross-entropy."""
  labels = np.asarray(labels, np.float64)
  features = np.stack([_logit(probabilities), np.ones(labels.size)], axis=1)
  positives = float(labels.sum())
  negatives = float(labels.size - positives)
  targets = np.where(labels > 0.5, (positives + 1.0) / (positives + 2.0), 1.0 / (negatives + 2.0))

  def loss(parameters):
    scores = features @ parameters
    return float(np.sum(np.logaddexp(0.0, scores) - targets * scores))

  parameters = np.asarray([1.0, 0.0])
  current = loss(parameters)
  for _ in range(max_iterations):
    fitted = _sigmoid(features @ parameters)
    gradient = features.T @ (fitted - targets)
    hessian = features.T @ (features * (fitted * (1.0 - fitted))[:, None])
    step = np.linalg.lstsq(hessian, gradient, rcond=None)[0]
    scale = 1.0
    while scale > 1e-10:
      candidate = parameters - scale * step
      candidate_loss = loss(candidate)
      if candidate_loss <= current:
        break
      scale *= 0.5
    else:
      break
    converged = abs(current - candidate_loss) < 1e-12 * max(1.0, abs(current))
    parameters, current = candidate, candidate_loss
    if converged:
      break
  return float(parameters[0]), float(parameters[1])


def _isotonic_by_pav(labels, probabilities):
  """(x, y): PAV of the labels on the unique probabilities (ties pooled first)."""
  probabilities = np.asarray(probabilities, np.float64)
  labels = np.asarray(labels, np.float64)
  unique_x, inverse = np.unique(probabilities, return_inverse=True)
  weights = np.bincount(inverse).astype(np.float64)
  means = np.bincount(inverse, weights=labels) / weights
  values, block_weights, counts = [], [], []
  for mean, weight in zip(means, weights):
    values.append(float(mean))
    block_weights.append(float(weight))
    counts.append(1)
    while len(values) > 1 and values[-2] > values[-1]:
      total = block_weights[-2] + block_weights[-1]
      values[-2] = (values[-2] * block_weights[-2] + values[-1] * block_weights[-1]) / total
      block_weights[-2] = total
      counts[-2] += counts[-1]
      del values[-1], block_weights[-1], counts[-1]
  return unique_x, np.repeat(values, counts)


def _inner_set(seed):
  """Labels and probabilities of a cell's inner patients: sizes 4-79, some separated, some with ties."""
  rng = np.random.default_rng(seed)
  size = int(rng.integers(4, 80))
  labels = rng.integers(0, 2, size)
  if labels.min() == labels.max():
    labels[0] = 1 - labels[0]
  separated = seed % 5 == 0
  probabilities = np.clip(rng.normal(0.35 + (0.5 if separated else 0.3) * labels, 0.05 if separated else 0.2),
                          1e-4, 1 - 1e-4)
  if seed % 3 == 0:
    probabilities = np.round(probabilities, 1)
  return labels, probabilities


@pytest.mark.parametrize("block", range(3))
def test_platt_equals_the_newton_fit(block):
  for seed in range(block * 100, (block + 1) * 100):
    labels, probabilities = _inner_set(seed)
    fitted = calibration.fit_platt(labels, probabilities)
    if fitted["slope"] == 0.0:  # the flat rule, tested in inner_validation_test
      continue
    slope, intercept = _platt_by_newton(labels, probabilities)
    assert fitted["slope"] == pytest.approx(slope, abs=1e-5), seed
    assert fitted["intercept"] == pytest.approx(intercept, abs=1e-5), seed
    queries = np.r_[np.linspace(0.0, 1.0, 101), probabilities]
    np.testing.assert_allclose(calibration.apply_calibration(fitted, queries),
                               _sigmoid(slope * _logit(queries) + intercept), atol=1e-6, err_msg=str(seed))


@pytest.mark.parametrize("block", range(3))
def test_isotonic_equals_pav(block):
  for seed in range(block * 100, (block + 1) * 100):
    labels, probabilities = _inner_set(seed)
    fitted = calibration.fit_isotonic(labels, probabilities)
    x, y = _isotonic_by_pav(labels, probabilities)
    queries = np.r_[np.linspace(-0.1, 1.1, 121), probabilities]
    np.testing.assert_allclose(calibration.apply_calibration(fitted, queries), np.interp(queries, x, y),
                               atol=1e-12, err_msg=str(seed))
    assert np.all(np.diff(fitted["y"]) >= 0) and fitted["x"] == sorted(fitted["x"])


def test_isotonic_of_one_probability_is_its_mean_label():
  fitted = calibration.fit_isotonic([0, 1, 1, 1], [0.4, 0.4, 0.4, 0.4])
  np.testing.assert_allclose(calibration.apply_calibration(fitted, [0.0, 0.4, 1.0]), [0.75, 0.75, 0.75])
