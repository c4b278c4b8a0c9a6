"""What a journal's reviewers ask for beyond accuracy: calibration, decision curves, covariate baselines.

  calibration_fit        logistic recalibration: label ~ Bernoulli(sigmoid(intercept + slope * logit(p))),
                         fitted by maximum likelihood (Newton-Raphson). Slope 1 and intercept 0 is perfect;
                         slope < 1 means overconfident predictions. Separated data (no finite optimum) is NaN.
  net_benefit            TP/n - FP/n * pt / (1 - pt), treating every patient with probability >= pt
                         (Vickers & Elkin 2006); treat-all and treat-none (0) are the references.
  covariate_scores       a covariate alone as a score: numbers as numbers, ordinal words (none < small <
                         moderate < large, as grid_statistics.ORDINAL_WORDS) as their rank; anything else is
                         not a score. Its AUC says how much of the task a clinician's grade already explains.
  failure_analysis       the subgroups with the worst sensitivity and specificity.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from pdx_tf.evaluation import burden, grid_statistics
from pdx_tf.evaluation import metrics as metrics_lib

# Thresholds of the decision curve (figure) and those tabulated in summary.json.
DECISION_THRESHOLDS = np.round(np.arange(1, 100) / 100.0, 2)
TABLE_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5)
# Probabilities are clipped before the logit so a reported 0 or 1 stays finite.
LOGIT_EPSILON = 1e-6
MAX_NEWTON_STEPS = 100
# A coefficient beyond this means the likelihood has no finite maximum (separated data).
MAX_COEFFICIENT = 1e3
WORST_SUBGROUPS = 3
# Subgroups smaller than this are listed but not ranked as failures (one patient decides their rates).
MIN_FAILURE_GROUP = 3


def logit(probabilities) -> np.ndarray:
  clipped = np.clip(np.asarray(probabilities, dtype=np.float64), LOGIT_EPSILON, 1.0 - LOGIT_EPSILON)
  return np.log(clipped) - np.log1p(-clipped)


def calibration_fit(labels, probabilities) -> dict[str, float]:
  """Logistic recalibration of the predictions.

  Args:
    labels: [N] 0/1 labels.
    probabilities: [N] predicted probabilities.

  Returns:
    {slope, intercept, calibration_in_the_large}: the slope and intercept of the joint fit of
    label ~ intercept + slope * logit(p), and the intercept with the slope fixed at 1 (logit(p) as an offset:
    mean over- or under-prediction). NaN without both classes or when the fit does not converge (separation).
  """
  positive, probabilities = np.asarray(labels, dtype=np.float64), np.asarray(probabilities, dtype=np.float64)
  nan = {"slope": math.nan, "intercept": math.nan, "calibration_in_the_large": math.nan}
  if positive.size == 0 or positive.min() == positive.max():
    return nan
  scores = logit(probabilities)
  # With one score, (quasi-)complete separation (the classes' scores do not overlap) leaves the slope without a
  # finite maximum; Newton would stop at whatever large value its tolerance allows.
  positives, negatives = scores[positive == 1], scores[positive == 0]
  separated = negatives.max() <= positives.min() or positives.max() <= negatives.min()
  joint = None if separated else _newton_logistic(
      np.stack([np.ones_like(scores), scores], axis=1), positive, np.zeros_like(scores))
  offset = _newton_logistic(np.ones((scores.size, 1)), positive, scores)
  return {
      "slope": float(joint[1]) if joint is not None else math.nan,
      "intercept": float(joint[0]) if joint is not None else math.nan,
      "calibration_in_the_large": float(offset[0]) if offset is not None else math.nan,
  }


def _newton_logistic(design: np.ndarray, labels: np.ndarray, offset: np.ndarray) -> np.ndarray | None:
  """Maximum-likelihood coefficients of labels ~ Bernoulli(sigmoid(design @ beta + offset)); None if none."""
  beta = np.zeros(design.shape[1])

  def log_likelihood(coefficients):
    eta = design @ coefficients + offset
    return float(np.sum(labels * eta - np.logaddexp(0.0, eta)))

  current = log_likelihood(beta)
  for _ in range(MAX_NEWTON_STEPS):
    eta = design @ beta + offset
    fitted = 1.0 / (1.0 + np.exp(-eta))
    gradient = design.T @ (labels - fitted)
    hessian = design.T @ (design * (fitted * (1.0 - fitted))[:, None])
    try:
      step = np.linalg.solve(hessian, gradient)
    except np.linalg.LinAlgError:
      return None
    # Step halving keeps every iteration an ascent (plain Newton can overshoot with extreme logits).
    scale = 1.0
    while scale > 1e-8:
      candidate = beta + scale * step
      value = log_likelihood(candidate)
      if value >= current - 1e-12:
        break
      scale /= 2.0
    beta, previous, current = candidate, current, value
    if np.any(np.abs(beta) > MAX_COEFFICIENT):
      return None
    if np.max(np.abs(scale * step)) < 1e-10 or abs(current - previous) < 1e-12:
      return beta
  return None


def net_benefit(labels, probabilities, thresholds) -> np.ndarray:
  """Net benefit of treating every patient with probability >= pt, for each threshold pt in (0, 1)."""
  positive = np.asarray(labels).astype(bool)
  probabilities = np.asarray(probabilities, dtype=np.float64)
  thresholds = np.asarray(thresholds, dtype=np.float64)
  if positive.size == 0:
    return np.full(thresholds.shape, np.nan)
  treated = probabilities[None, :] >= thresholds[:, None]
  true_positive = np.sum(treated & positive[None, :], axis=1)
  false_positive = np.sum(treated & ~positive[None, :], axis=1)
  count = positive.size
  return true_positive / count - false_positive / count * thresholds / (1.0 - thresholds)


def treat_all_net_benefit(labels, thresholds) -> np.ndarray:
  """Net benefit of treating everyone: prevalence - (1 - prevalence) * pt / (1 - pt)."""
  positive = np.asarray(labels).astype(bool)
  thresholds = np.asarray(thresholds, dtype=np.float64)
  if positive.size == 0:
    return np.full(thresholds.shape, np.nan)
  prevalence = positive.mean()
  return prevalence - (1.0 - prevalence) * thresholds / (1.0 - thresholds)


def decision_curve(label_sets: Sequence[np.ndarray], probability_sets: Sequence[np.ndarray]) -> dict[str, Any]:
  """The decision curve averaged over prediction sets (the repeats of a grid, or one external cohort).

  Returns:
    {thresholds, model, treat_all, treat_none} over DECISION_THRESHOLDS (the figure) and `table`: one row per
    TABLE_THRESHOLDS entry with the same three values; model and treat_all are means over the sets.
  """
  model = np.mean([net_benefit(labels, probabilities, DECISION_THRESHOLDS)
                   for labels, probabilities in zip(label_sets, probability_sets)], axis=0)
  treat_all = np.mean([treat_all_net_benefit(labels, DECISION_THRESHOLDS) for labels in label_sets], axis=0)
  table = []
  for threshold in TABLE_THRESHOLDS:
    position = int(np.argmin(np.abs(DECISION_THRESHOLDS - threshold)))
    table.append({"threshold": threshold, "model": float(model[position]), "treat_all": float(treat_all[position]),
                  "treat_none": 0.0})
  return {
      "rule": "net benefit = TP/n - FP/n * pt/(1-pt), treating probability >= pt",
      "n_sets": len(label_sets),
      "thresholds": DECISION_THRESHOLDS.tolist(),
      "model": model.tolist(),
      "treat_all": treat_all.tolist(),
      "treat_none": [0.0] * DECISION_THRESHOLDS.size,
      "table": table,
  }


def covariate_scores(values: Mapping[str, str]) -> tuple[str | None, dict[str, float]]:
  """A covariate's values as a score, or (None, {}) when it is not numeric or ordinal.

  Args:
    values: patient_id -> the covariate's text value; empty values are missing.

  Returns:
    (kind, patient_id -> score) with kind "numeric" or "ordinal (none < small < ...)"; patients with a
    missing value are left out.
  """
  present = {patient_id: text.strip() for patient_id, text in values.items() if text.strip() != ""}
  if not present:
    return None, {}
  numbers = {}
  for patient_id, text in present.items():
    try:
      number = float(text)
    except ValueError:
      break
    if not math.isfinite(number):
      break
    numbers[patient_id] = number
  else:
    return "numeric", numbers
  words = grid_statistics.ORDINAL_WORDS
  if all(text.lower() in words for text in present.values()):
    used = sorted({text.lower() for text in present.values()}, key=words.index)
    return f"ordinal ({' < '.join(used)})", {patient_id: float(words.index(text.lower()))
                                             for patient_id, text in present.items()}
  return None, {}


def covariate_baselines(columns: Sequence[str], patients: Mapping[str, Mapping[str, str]],
                        labels: Mapping[str, int], weights: np.ndarray) -> dict[str, Any]:
  """The AUC of each numeric or ordinal covariate alone as the score, with its patient-bootstrap 95 % CI.

  Args:
    columns: covariate column names.
    patients: patient_id -> row holding the covariates (text).
    labels: patient_id -> 0/1 label of the patients evaluated; sorted(labels) is the order of `weights`' columns.
    weights: [B, len(labels)] bootstrap counts (grid_statistics.bootstrap_weights), shared with the models' CIs.

  Returns:
    column -> {kind, n_patients, n_missing, auc: {estimate, low, high, n_bootstrap_defined}}; a higher value is
    read as more likely positive, so an AUC below 0.5 means the covariate runs the other way.
  """
  order = sorted(labels)
  result = {}
  for column in columns:
    kind, scores = covariate_scores({patient_id: patients[patient_id].get(column) or "" for patient_id in order})
    if kind is None:
      continue
    kept = [position for position, patient_id in enumerate(order) if patient_id in scores]
    kept_labels = np.asarray([labels[order[position]] for position in kept], dtype=np.int64)
    kept_scores = np.asarray([scores[order[position]] for position in kept], dtype=np.float64)
    estimate = metrics_lib.binary_metrics(kept_labels, kept_scores)["auc"] if kept else math.nan
    if kept and weights.shape[0]:
      replicates = metrics_lib.weighted_metrics(kept_labels, kept_scores, weights[:, kept])["auc"]
    else:
      replicates = np.empty(0)
    result[column] = {"kind": kind, "n_patients": len(kept), "n_missing": len(order) - len(kept),
                      "auc": grid_statistics.percentile_interval(estimate, replicates)}
  return result


def failure_analysis(subgroups: Mapping[str, Any], value_of) -> dict[str, list[dict[str, Any]]]:
  """The subgroups with the lowest sensitivity and the lowest specificity.

  Args:
    subgroups: column -> {rule, groups: [{group, n_patients, n_positive, n_negative, metrics}]}.
    value_of: (group entry, metric) -> the group's value of the metric (None or NaN when undefined).

  Returns:
    {"sensitivity": [...], "specificity": [...]}: up to WORST_SUBGROUPS entries each, worst first, of groups
    with at least MIN_FAILURE_GROUP patients of the class the metric is about.
  """
  result = {}
  for metric, count_key in (("sensitivity", "n_positive"), ("specificity", "n_negative")):
    candidates = []
    for column, entry in subgroups.items():
      for group in entry["groups"]:
        value = value_of(group, metric)
        if group[count_key] >= MIN_FAILURE_GROUP and value is not None and math.isfinite(value):
          candidates.append({"covariate": column, "group": group["group"], "n_patients": group["n_patients"],
                             count_key: group[count_key], metric: float(value)})
    candidates.sort(key=lambda item: (item[metric], item["covariate"], item["group"]))
    result[metric] = candidates[:WORST_SUBGROUPS]
  return result


def _grid_subgroup_value(group: Mapping[str, Any], metric: str):
  return group["metrics"][metric]["mean"]


def extend_grid_evaluation(evaluation: grid_statistics.TaskEvaluation, num_bootstrap: int,
                           seed: int) -> grid_statistics.TaskEvaluation:
  """Adds calibration, the decision curve, the covariate baselines and the failure analysis to a grid's summary.

  Args:
    evaluation: grid_statistics.evaluate_task's result.
    num_bootstrap, seed: as given to evaluate_task, so the baselines' CIs use the models' resamples.

  Returns:
    The evaluation with summary keys `calibration` (slope, intercept, calibration_in_the_large: statistics over
    the repeats' pooled predictions), `decision_curve` (mean over repeats), `covariate_baselines` (beside
    `model_auc`, the models' pooled AUC and CI), `failure_analysis` and `burden` (the metrics by disease burden,
    pdx_tf/evaluation/burden.py; None without a PCI or nodule-count column) added.
  """
  task_runs, pools = evaluation.task_runs, evaluation.pools
  fits = [calibration_fit(pool.labels, pool.probabilities) for pool in pools]
  calibration = {name: grid_statistics.summarize_values([fit[name] for fit in fits])
                 for name in ("slope", "intercept", "calibration_in_the_large")}
  calibration["fit"] = "per repeat: label ~ intercept + slope * logit(probability) on the pooled predictions"
  evaluated = sorted({patient_id for pool in pools for patient_id in pool.patient_ids})
  labels = {patient_id: int(task_runs.patients[patient_id][f"label_{task_runs.task}"]) for patient_id in evaluated}
  weights = grid_statistics.bootstrap_weights(len(evaluated), num_bootstrap, seed, task_runs.task)
  summary = dict(evaluation.summary)
  summary["calibration"] = calibration
  summary["decision_curve"] = decision_curve([pool.labels for pool in pools], [pool.probabilities for pool in pools])
  summary["covariate_baselines"] = {
      "model_auc": summary["pooled_ci95"]["auc"],
      "covariates": covariate_baselines(task_runs.covariate_columns, task_runs.patients, labels, weights),
  }
  summary["failure_analysis"] = failure_analysis(summary["subgroups"], _grid_subgroup_value)
  own = grid_statistics.own_thresholds(task_runs)
  summary["burden"] = burden.burden_split(task_runs, pools, float(evaluation.summary["threshold"]), own,
                                          num_bootstrap, seed)
  return dataclasses.replace(evaluation, summary=grid_statistics.json_safe(summary))
