"""Operating thresholds and probability calibration fitted on a cell's inner patients (numpy only).

Every function here is fitted on the inner patients' PATIENT probabilities (pdx_tf.training.splits.inner_split),
never on a test fold, and its result is plain JSON stored in the cell's run.json:
- `operating_threshold`: "fixed" (a number, 0.5 by default) or "inner_youden" (the Youden-optimal threshold of
  the inner patients, pdx_tf.evaluation.metrics.youden_threshold). It applies to the uncalibrated `probability`.
- `fit_platt`: a logistic fit of the label on logit(p), with Platt's (1999) smoothed targets
  (N+ + 1)/(N+ + 2) and 1/(N- + 2), so a perfectly separated inner set still gives finite parameters.
  calibrated = sigmoid(slope * logit(p) + intercept).
- `fit_isotonic`: pool-adjacent-violators (PAV) of the label on p (ties in p pooled first), applied by linear
  interpolation between the fitted points and clipped outside them (scikit-learn's IsotonicRegression with
  out_of_bounds="clip").
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from pdx_tf import metrics as metrics_lib

CALIBRATIONS = ("none", "platt", "isotonic")
THRESHOLD_RULES = ("fixed", "inner_youden")
# Probabilities are clipped to [EPSILON, 1 - EPSILON] before the logit: a saturated sigmoid is 0 or 1 exactly.
EPSILON = 1e-6


def parse_threshold(text: str | float) -> tuple[str, float | None]:
  """("fixed", value) for a number in (0, 1), ("inner_youden", None) for that word.

  Raises:
    ValueError: anything else.
  """
  if isinstance(text, str) and text.strip() == "inner_youden":
    return "inner_youden", None
  try:
    value = float(text)
  except (TypeError, ValueError):
    value = float("nan")
  if not 0.0 < value < 1.0:
    raise ValueError(f"--threshold must be a probability strictly between 0 and 1 or inner_youden, got {text!r}")
  return "fixed", value


def operating_threshold(rule: str, fixed: float | None, labels, probabilities) -> float:
  """The threshold of a cell: `fixed`, or the Youden-optimal one of the inner patients (labels, probabilities).

  Raises:
    ValueError: an unknown rule, or inner_youden without both classes among the inner patients.
  """
  if rule == "fixed":
    return float(fixed)
  if rule != "inner_youden":
    raise ValueError(f"unknown threshold rule {rule!r}; use one of {', '.join(THRESHOLD_RULES)}")
  point = metrics_lib.youden_threshold(np.asarray(labels), np.asarray(probabilities, np.float64))
  if not np.isfinite(point.threshold):
    raise ValueError("inner_youden needs inner patients of both classes; raise --inner_fraction")
  return float(point.threshold)


# Inner probabilities whose logits span less than this are one probability: a float32 sigmoid output resolves
# about 6e-8 near 0.5 (1e-7 relative elsewhere), so a collapsed model's patients differ by ~1e-6 in logit at most,
# while any spread a model means to make between patients is orders of magnitude above 1e-5.
FLAT_LOGIT_SPREAD = 1e-5


def logit(probabilities) -> np.ndarray:
  clipped = np.clip(np.asarray(probabilities, np.float64), EPSILON, 1.0 - EPSILON)
  return np.log(clipped) - np.log1p(-clipped)


def _sigmoid(values: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.tanh(0.5 * values))  # overflow-free


def fit_platt(labels, probabilities, *, max_iterations: int = 100) -> dict[str, Any]:
  """Platt scaling of patient probabilities (module docstring): {"method": "platt", "slope", "intercept"}.

  Newton's method with step halving on the cross-entropy of the smoothed targets, from the identity map. When
  every probability is equal (their logits within FLAT_LOGIT_SPREAD, float32 noise) the slope is not
  identifiable: it is 0 and the intercept is the logit of the mean target.
  """
  labels = np.asarray(labels, np.float64)
  features = np.stack([logit(probabilities), np.ones(labels.size)], axis=1)
  positives = float(labels.sum())
  negatives = float(labels.size - positives)
  targets = np.where(labels > 0.5, (positives + 1.0) / (positives + 2.0), 1.0 / (negatives + 2.0))

  def loss(parameters):
    scores = features @ parameters
    # log(1 + e^s) - t * s, computed stably.
    return float(np.sum(np.logaddexp(0.0, scores) - targets * scores))

  if np.ptp(features[:, 0]) < FLAT_LOGIT_SPREAD:
    # One distinct probability (a collapsed model) up to float32 noise: the slope is not identifiable (fitted, it
    # would scale the noise by 1e6 or more and rank patients by it); keep it at 0 and fit the intercept alone,
    # whose optimum is the mean target's logit.
    return {"method": "platt", "slope": 0.0, "intercept": float(logit(np.mean(targets))[()])}
  parameters = np.asarray([1.0, 0.0])  # the identity: sigmoid(logit(p)) = p
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
  return {"method": "platt", "slope": float(parameters[0]), "intercept": float(parameters[1])}


def fit_isotonic(labels, probabilities) -> dict[str, Any]:
  """PAV isotonic regression (non-decreasing) of the labels on the probabilities: {"method": "isotonic",
  "x": fitted points' probabilities, "y": their calibrated values} (module docstring)."""
  probabilities = np.asarray(probabilities, np.float64)
  labels = np.asarray(labels, np.float64)
  order = np.argsort(probabilities, kind="stable")
  unique_x, inverse = np.unique(probabilities[order], return_inverse=True)
  weights = np.bincount(inverse).astype(np.float64)
  means = np.bincount(inverse, weights=labels[order]) / weights
  # Blocks of [value, weight, count of unique points]; a violation merges the last two blocks.
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
  fitted = np.repeat(values, counts)
  return {"method": "isotonic", "x": unique_x.tolist(), "y": fitted.tolist()}


def fit_calibration(method: str, labels, probabilities) -> dict[str, Any] | None:
  """The calibration `method` ("none", "platt", "isotonic") fitted on (labels, probabilities); None for none."""
  if method == "none":
    return None
  if method == "platt":
    return fit_platt(labels, probabilities)
  if method == "isotonic":
    return fit_isotonic(labels, probabilities)
  raise ValueError(f"unknown calibration {method!r}; use one of {', '.join(CALIBRATIONS)}")


def apply_calibration(parameters: Mapping[str, Any], probabilities) -> np.ndarray:
  """Calibrated probabilities under parameters from `fit_calibration`."""
  probabilities = np.asarray(probabilities, np.float64)
  if parameters["method"] == "platt":
    return _sigmoid(parameters["slope"] * logit(probabilities) + parameters["intercept"])
  if parameters["method"] == "isotonic":
    return np.interp(probabilities, np.asarray(parameters["x"]), np.asarray(parameters["y"]))
  raise ValueError(f"unknown calibration method {parameters['method']!r}")
