"""Operating thresholds and probability calibration fitted on a cell's inner patients (scikit-learn fits).

Every function here is fitted on the inner patients' PATIENT probabilities (pdx_tf.training.splits.inner_split),
never on a test fold, and its result is plain JSON stored in the cell's run.json:
- `operating_threshold`: "fixed" (a number, 0.5 by default) or "inner_youden" (the Youden-optimal threshold of
  the inner patients, pdx_tf.evaluation.metrics.youden_threshold). It applies to the uncalibrated `probability`.
- `fit_platt`: a logistic fit of the label on logit(p), with Platt's (1999) smoothed targets
  (N+ + 1)/(N+ + 2) and 1/(N- + 2), so a perfectly separated inner set still gives finite parameters.
  calibrated = sigmoid(slope * logit(p) + intercept).
- `fit_isotonic`: scikit-learn's IsotonicRegression (pool-adjacent-violators, ties in p pooled first) of the label
  on p, applied by linear interpolation between the fitted points and clipped outside them (out_of_bounds="clip").
Both were hand-written (Newton iterations, PAV) before scikit-learn became a run-time dependency; the calibrated
probabilities agree with those within 1e-6 (tests/calibration_test.py keeps the numpy versions as the reference).
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


def fit_platt(labels, probabilities) -> dict[str, Any]:
  """Platt scaling of patient probabilities (module docstring): {"method": "platt", "slope", "intercept"}.

  scikit-learn's unpenalised LogisticRegression of the label on logit(p); Platt's smoothed targets t enter as
  sample weights of each patient written twice (as a positive with weight t, as a negative with weight 1 - t),
  which is the cross-entropy of the smoothed targets exactly. When every probability is equal (their logits within
  FLAT_LOGIT_SPREAD, float32 noise) the slope is not identifiable: it is 0 and the intercept is the logit of the
  mean target.
  """
  from sklearn import linear_model  # pylint: disable=import-outside-toplevel  (keeps `import train` light)

  labels = np.asarray(labels, np.float64)
  features = logit(probabilities)[:, None]
  positives = float(labels.sum())
  negatives = float(labels.size - positives)
  targets = np.where(labels > 0.5, (positives + 1.0) / (positives + 2.0), 1.0 / (negatives + 2.0))
  if np.ptp(features[:, 0]) < FLAT_LOGIT_SPREAD:
    # One distinct probability (a collapsed model) up to float32 noise: the slope is not identifiable (fitted, it
    # would scale the noise by 1e6 or more and rank patients by it); keep it at 0 and fit the intercept alone,
    # whose optimum is the mean target's logit.
    return {"method": "platt", "slope": 0.0, "intercept": float(logit(np.mean(targets))[()])}
  # C=inf: no penalty (Platt's fit); tol 1e-12 brings lbfgs within 1e-6 of the exact optimum (tests say how close).
  model = linear_model.LogisticRegression(C=np.inf, tol=1e-12, max_iter=10000)
  model.fit(np.vstack([features, features]), np.r_[np.ones(labels.size), np.zeros(labels.size)],
            sample_weight=np.r_[targets, 1.0 - targets])
  return {"method": "platt", "slope": float(model.coef_[0, 0]), "intercept": float(model.intercept_[0])}


def fit_isotonic(labels, probabilities) -> dict[str, Any]:
  """Isotonic (non-decreasing) regression of the labels on the probabilities by scikit-learn's IsotonicRegression:
  {"method": "isotonic", "x": its threshold probabilities, "y": their calibrated values} (module docstring).

  `apply_calibration` interpolates between them and clips outside, which is IsotonicRegression.predict with
  out_of_bounds="clip".
  """
  from sklearn import isotonic  # pylint: disable=import-outside-toplevel

  model = isotonic.IsotonicRegression(out_of_bounds="clip", increasing=True)
  model.fit(np.asarray(probabilities, np.float64), np.asarray(labels, np.float64))
  return {"method": "isotonic", "x": np.asarray(model.X_thresholds_, np.float64).tolist(),
          "y": np.asarray(model.y_thresholds_, np.float64).tolist()}


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
