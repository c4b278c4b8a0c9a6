"""Tests for pdx_tf.evaluation.clinical: recalibration fit, net benefit, covariate baselines, failure analysis."""

import math

import numpy as np
import pytest
from sklearn import linear_model, metrics as sk_metrics

from pdx_tf.evaluation import clinical, grid_statistics


def _cohort(seed=3, count=200):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, count)
  # Overconfident predictions: the true logit is half the reported one, plus noise.
  reported = (2.0 * labels - 1.0) * 1.2 + rng.normal(0.0, 2.0, count)
  return labels, 1.0 / (1.0 + np.exp(-reported))


def test_calibration_fit_matches_unpenalised_sklearn():
  labels, probabilities = _cohort()
  fit = clinical.calibration_fit(labels, probabilities)
  reference = linear_model.LogisticRegression(C=1e12, tol=1e-12, max_iter=10000)
  reference.fit(np.log(probabilities / (1 - probabilities))[:, None], labels)
  assert fit["slope"] == pytest.approx(reference.coef_[0, 0], abs=1e-4)
  assert fit["intercept"] == pytest.approx(reference.intercept_[0], abs=1e-4)


def test_calibration_of_perfectly_calibrated_scores_is_identity():
  # Labels drawn from the probabilities themselves: slope ~1, intercept ~0 on a large sample.
  rng = np.random.default_rng(7)
  probabilities = rng.uniform(0.02, 0.98, 40000)
  labels = (rng.uniform(size=probabilities.size) < probabilities).astype(int)
  fit = clinical.calibration_fit(labels, probabilities)
  assert fit["slope"] == pytest.approx(1.0, abs=0.05)
  assert fit["intercept"] == pytest.approx(0.0, abs=0.05)
  assert fit["calibration_in_the_large"] == pytest.approx(0.0, abs=0.05)


def test_calibration_in_the_large_closed_form():
  # With the slope fixed at 1 and a constant prediction q, the MLE intercept is logit(prevalence) - logit(q).
  labels = np.array([1, 0, 0, 0, 1, 0, 0, 0])  # prevalence 1/4
  probabilities = np.full(labels.size, 0.5)
  fit = clinical.calibration_fit(labels, probabilities)
  assert fit["calibration_in_the_large"] == pytest.approx(math.log(0.25 / 0.75), abs=1e-8)
  assert math.isnan(fit["slope"])  # a constant score leaves the slope unidentifiable


def test_calibration_is_nan_when_undefined():
  assert math.isnan(clinical.calibration_fit([1, 1, 1], [0.2, 0.5, 0.9])["slope"])
  separated = clinical.calibration_fit([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])  # no finite maximum
  assert math.isnan(separated["slope"]) and math.isnan(separated["intercept"])


def test_net_benefit_by_hand():
  labels = [1, 1, 0, 0, 0]
  probabilities = [0.9, 0.3, 0.6, 0.2, 0.1]
  # pt = 0.25: treated 0.9, 0.3, 0.6 -> TP 2, FP 1: 2/5 - 1/5 * (0.25/0.75) = 0.4 - 0.0666...
  # pt = 0.5: treated 0.9, 0.6 -> TP 1, FP 1: 1/5 - 1/5 * 1 = 0.
  # pt = 0.75: treated 0.9 -> TP 1: 1/5 = 0.2.
  values = clinical.net_benefit(labels, probabilities, [0.25, 0.5, 0.75])
  np.testing.assert_allclose(values, [0.4 - 0.2 / 3.0, 0.0, 0.2])
  # Treat all: prevalence 0.4 - 0.6 * pt / (1 - pt).
  np.testing.assert_allclose(clinical.treat_all_net_benefit(labels, [0.25, 0.5]), [0.4 - 0.2, 0.4 - 0.6])


def test_decision_curve_table_and_mean_over_sets():
  labels = [np.array([1, 0]), np.array([1, 1, 0, 0])]
  probabilities = [np.array([0.8, 0.3]), np.array([0.6, 0.05, 0.4, 0.02])]
  curve = clinical.decision_curve(labels, probabilities)
  assert curve["thresholds"][0] == 0.01 and curve["thresholds"][-1] == 0.99 and len(curve["thresholds"]) == 99
  row = next(entry for entry in curve["table"] if entry["threshold"] == 0.2)
  # Set 1 at 0.2: treated 0.8, 0.3 -> 1/2 - 1/2 * 0.25 = 0.375. Set 2: treated 0.6, 0.4 -> 1/4 - 1/4 * 0.25.
  assert row["model"] == pytest.approx((0.375 + (0.25 - 0.0625)) / 2)
  assert row["treat_all"] == pytest.approx(0.5 - 0.5 * 0.25)
  assert row["treat_none"] == 0.0


def test_covariate_scores_ordinal_numeric_and_categorical():
  kind, scores = clinical.covariate_scores({"a": "large", "b": "none", "c": "Moderate", "d": "small", "e": ""})
  assert kind == "ordinal (none < small < moderate < large)"
  assert scores["b"] < scores["d"] < scores["c"] < scores["a"] and "e" not in scores
  kind, scores = clinical.covariate_scores({"a": "12", "b": "3.5", "c": ""})
  assert kind == "numeric" and scores == {"a": 12.0, "b": 3.5}
  assert clinical.covariate_scores({"a": "A", "b": "B"}) == (None, {})


def test_covariate_baselines_auc_equals_sklearn_and_ci_uses_bootstrap():
  rng = np.random.default_rng(1)
  patients, labels = {}, {}
  grades = ("none", "small", "moderate", "large")
  for index in range(30):
    label = int(index % 3 == 0)
    pci = int(rng.integers(0, 40)) if label else int(rng.integers(0, 12))
    patients[f"p{index:02d}"] = {"pci": str(pci), "ascites": grades[int(rng.integers(0, 4))],
                                 "site": "AB"[index % 2]}
    labels[f"p{index:02d}"] = label
  patients["p05"]["pci"] = ""  # missing: left out of the pci baseline only
  weights = grid_statistics.bootstrap_weights(len(labels), 200, 0, "p")
  baselines = clinical.covariate_baselines(("pci", "ascites", "site"), patients, labels, weights)
  assert set(baselines) == {"pci", "ascites"}  # site is neither numeric nor ordinal
  order = sorted(labels)
  kept = [patient_id for patient_id in order if patients[patient_id]["pci"]]
  expected = sk_metrics.roc_auc_score([labels[p] for p in kept], [float(patients[p]["pci"]) for p in kept])
  assert baselines["pci"]["auc"]["estimate"] == pytest.approx(expected)
  assert baselines["pci"]["n_patients"] == 29 and baselines["pci"]["n_missing"] == 1
  ranks = [grades.index(patients[p]["ascites"]) for p in order]
  assert baselines["ascites"]["auc"]["estimate"] == pytest.approx(
      sk_metrics.roc_auc_score([labels[p] for p in order], ranks))
  interval = baselines["pci"]["auc"]
  assert interval["low"] < interval["estimate"] < interval["high"] and interval["n_bootstrap_defined"] == 200


def test_failure_analysis_ranks_worst_groups_and_skips_tiny_ones():
  subgroups = {
      "ascites": {"groups": [
          {"group": "none", "n_patients": 10, "n_positive": 5, "n_negative": 5,
           "metrics": {"sensitivity": 0.9, "specificity": 0.4}},
          {"group": "large", "n_patients": 8, "n_positive": 6, "n_negative": 2,
           "metrics": {"sensitivity": 0.5, "specificity": 0.0}},
      ]},
      "pci": {"groups": [
          {"group": ">20", "n_patients": 4, "n_positive": 4, "n_negative": 0,
           "metrics": {"sensitivity": 0.75, "specificity": None}},
      ]},
  }
  result = clinical.failure_analysis(subgroups, lambda group, metric: group["metrics"][metric])
  assert [(entry["covariate"], entry["group"]) for entry in result["sensitivity"]] == [
      ("ascites", "large"), ("pci", ">20"), ("ascites", "none")]
  # "large" has only 2 negatives: too few to rank its specificity.
  assert [(entry["group"], entry["specificity"]) for entry in result["specificity"]] == [("none", 0.4)]
