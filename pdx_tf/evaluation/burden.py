"""Does the model find small-volume disease? Every metric split by disease burden, with patient-bootstrap CIs.

Radiologists find most heavy disease and miss small implants, so a model's overall AUC says little about where it
helps: a model that reads burden (omental cake, ascites) can score well overall and be at chance on the patients
who need it. The burden split answers that on the user's own cohort.

In: one task's grid evaluation (grid_statistics.TaskEvaluation: the repeats' pooled out-of-fold predictions) and a
burden covariate of patients.csv, the first of BURDEN_COLUMNS present (case-insensitive): the PCI (0-39) or a
nodule count. Out: summary["burden"] = {column, rule, cuts, strata: [...]}.

The rule. The POSITIVE patients with a numeric burden are cut into tertiles of their own values (cuts at the 1/3
and 2/3 quantiles, numpy's linear interpolation): low [min, q1], middle (q1, q2], high (q2, max] (fewer strata
when values tie). Each stratum is scored as its positives against ALL negatives of the task, so the AUC of the
low stratum answers "does the model rank a small-volume positive above a negative?", and its sensitivity is the
share of small-volume positives found at the decision threshold (specificity is the same in every stratum: the
negatives are shared). Metrics are per repeat (pooled folds), then averaged over repeats, as in the summary's
`per_repeat`; the 95 % CIs come from the evaluation's own patient-bootstrap weights (grid_statistics.
bootstrap_weights over all evaluated patients in sorted order), so every stratum moves with the same resamples.
Positives without a numeric burden are counted as `n_positive_missing` and left out of the strata.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from pdx_tf.evaluation import metrics as metrics_lib
from pdx_tf.evaluation.grid_statistics import Pool, bootstrap_weights, percentile_interval, pool_thresholds
from pdx_tf.evaluation.runs import TaskRuns

# Burden covariates, in order of preference: the surgical PCI, then a count of nodules.
BURDEN_COLUMNS = ("pci", "nodule_count", "nodules", "n_nodules")
STRATUM_NAMES = ("low", "middle", "high")
BURDEN_METRICS = ("auc", "sensitivity", "accuracy")


def burden_column(columns: Sequence[str]) -> str | None:
  """The patients.csv column holding the burden (first of BURDEN_COLUMNS, any case), or None."""
  by_lower = {column.lower(): column for column in columns}
  return next((by_lower[name] for name in BURDEN_COLUMNS if name in by_lower), None)


def _number(text: str | None) -> float | None:
  try:
    value = float(str(text).strip())
  except ValueError:
    return None
  return value if np.isfinite(value) else None


def burden_strata(values: Mapping[str, float]) -> tuple[list[float], list[tuple[str, str, set[str]]]]:
  """Tertiles of the positives' burden values.

  Args:
    values: positive patient_id -> burden value.

  Returns:
    (cuts, strata): the distinct inner cut points, and per stratum (name, interval text, its patient IDs), in
    increasing burden; empty strata are dropped (tied values).
  """
  if not values:
    return [], []
  array = np.asarray(sorted(values.values()), np.float64)
  low, high = float(array[0]), float(array[-1])
  cuts = sorted({float(cut) for cut in np.quantile(array, [1.0 / 3.0, 2.0 / 3.0])} - {high})
  bounds = [low] + cuts + [high]
  names = STRATUM_NAMES if len(bounds) == 4 else (("low", "high") if len(bounds) == 3 else ("all",))
  strata = []
  for position, name in enumerate(names):
    lower, upper = bounds[position], bounds[position + 1]
    if position == 0:
      members = {patient_id for patient_id, value in values.items() if value <= upper}
      text = f"[{lower:g}, {upper:g}]"
    else:
      members = {patient_id for patient_id, value in values.items() if lower < value <= upper}
      text = f"({lower:g}, {upper:g}]"
    if members:
      strata.append((name, text, members))
  return cuts, strata


def burden_split(task_runs: TaskRuns, pools: Sequence[Pool], threshold: float,
                 thresholds: Mapping[Any, float] | None, num_bootstrap: int, seed: int) -> dict[str, Any] | None:
  """The task's metrics by burden stratum (module docstring); None when patients.csv has no burden column.

  Args:
    task_runs, pools: the task's runs and its repeats' pooled predictions (grid_statistics.pool_repeats).
    threshold, thresholds: the decision threshold, or each cell's own (grid_statistics.own_thresholds).
    num_bootstrap, seed: the evaluation's bootstrap (the same replicates as its other CIs).

  Returns:
    {column, rule, cuts, n_positive_missing, strata: [{stratum, range, n_positive, n_negative, metrics: {auc,
    sensitivity, accuracy: {estimate, low, high, n_bootstrap_defined}}}]}.
  """
  column = burden_column(task_runs.covariate_columns)
  if column is None:
    return None
  label_key = f"label_{task_runs.task}"
  evaluated = sorted({patient_id for pool in pools for patient_id in pool.patient_ids})
  index = {patient_id: position for position, patient_id in enumerate(evaluated)}
  positives = [patient_id for patient_id in evaluated if int(task_runs.patients[patient_id][label_key]) == 1]
  negatives = {patient_id for patient_id in evaluated if int(task_runs.patients[patient_id][label_key]) == 0}
  values = {patient_id: _number(task_runs.patients[patient_id].get(column)) for patient_id in positives}
  known = {patient_id: value for patient_id, value in values.items() if value is not None}
  cuts, strata = burden_strata(known)
  weights = bootstrap_weights(len(evaluated), num_bootstrap, seed, task_runs.task)
  per_pool = pool_thresholds(task_runs, pools, threshold, thresholds)[0]
  entries = []
  for name, text, members in strata:
    chosen = members | negatives
    point = {metric: [] for metric in BURDEN_METRICS}
    replicates = {metric: [] for metric in BURDEN_METRICS}
    for pool, pool_threshold in zip(pools, per_pool):
      mask = np.asarray([patient_id in chosen for patient_id in pool.patient_ids], bool)
      if not mask.any():
        continue
      here = pool_threshold[mask] if isinstance(pool_threshold, np.ndarray) else pool_threshold
      labels, probabilities = pool.labels[mask], pool.probabilities[mask]
      columns = [index[patient_id] for patient_id, keep in zip(pool.patient_ids, mask) if keep]
      values_here = metrics_lib.binary_metrics(labels, probabilities, here)
      resampled = metrics_lib.weighted_metrics(labels, probabilities, weights[:, columns], here) \
          if num_bootstrap else {}
      for metric in BURDEN_METRICS:
        point[metric].append(values_here[metric])
        if num_bootstrap:
          replicates[metric].append(resampled[metric])
    metrics = {}
    for metric in BURDEN_METRICS:
      estimate = float(np.nanmean(point[metric])) if np.isfinite(point[metric]).any() else float("nan")
      stacked = np.asarray(replicates[metric]) if replicates[metric] else np.full((1, 0), np.nan)
      with np.errstate(invalid="ignore"):
        counts = np.isfinite(stacked).sum(axis=0)
        means = np.where(counts > 0, np.nansum(stacked, axis=0) / np.maximum(counts, 1), np.nan)
      metrics[metric] = percentile_interval(estimate, means)
    entries.append({"stratum": name, "range": text, "n_positive": len(members), "n_negative": len(negatives),
                    "metrics": metrics})
  return {
      "column": column,
      "rule": ("tertiles of the positives' values; each stratum's positives against all negatives; means over "
               "repeats with 95 % patient-bootstrap CIs"),
      "cuts": cuts,
      "n_positive_missing": len(positives) - len(known),
      "strata": entries,
  }
