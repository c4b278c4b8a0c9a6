"""Metrics over the repeats x folds grid: per cell, per repeat (pooled out-of-fold), bootstrap CIs, subgroups.

Two views, both reported:
  per cell    each model on its own held-out fold (192 values for 24 repeats x 8 folds; the paper's unit);
  per repeat  the folds' out-of-fold predictions of one repeat pooled, so every patient is scored once.
Summaries over cells or repeats drop NaN (undefined) values and report how many were defined (`n`); the SD is
the sample SD (ddof=1) and the percentiles use numpy's linear interpolation.

Bootstrap: patients are resampled with replacement (multinomial counts over all evaluated patients) and the
same resample weights every cell and repeat, so a patient's predictions from all 24 repeats move together.
For each replicate the per-cell mean and the per-repeat mean are recomputed; the 95 % CI is the 2.5/97.5
percentile of those replicates (replicates where a metric is undefined are dropped and counted).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from pdx_tf.errors import RunsError
from pdx_tf.evaluation import metrics as metrics_lib
from pdx_tf.evaluation.runs import Cell, cell_name, TaskRuns

# Fixed clinical bins for the peritoneal cancer index (0-39): (inclusive upper bound, label). A value goes to
# the first bin whose bound it does not exceed, so a non-integer 10.5 falls in 11-20.
PCI_BINS = ((0.0, "0"), (10.0, "1-10"), (20.0, "11-20"), (math.inf, ">20"))
# Numeric covariates with at most this many distinct values are treated as categories (e.g. 0/1 flags).
MAX_NUMERIC_CATEGORIES = 5
MISSING_GROUP = "missing"
# Ordinal words that read best in clinical order rather than alphabetically.
ORDINAL_WORDS = ("none", "trace", "small", "mild", "moderate", "medium", "large", "massive", "severe")
TASK_KEYS = {"p": 0, "sb": 1}


def summarize_values(values: Sequence[float]) -> dict[str, float]:
  """{n, mean, sd, median, p2_5, p97_5} over the defined (finite) values; NaN when too few are defined."""
  array = np.asarray(values, dtype=np.float64)
  defined = array[np.isfinite(array)]
  if defined.size == 0:
    return {"n": 0, "mean": math.nan, "sd": math.nan, "median": math.nan, "p2_5": math.nan, "p97_5": math.nan}
  low, high = np.percentile(defined, [2.5, 97.5])
  return {
      "n": int(defined.size),
      "mean": float(defined.mean()),
      "sd": float(defined.std(ddof=1)) if defined.size > 1 else math.nan,
      "median": float(np.median(defined)),
      "p2_5": float(low),
      "p97_5": float(high),
  }


def _nan_mean(stack: np.ndarray, axis: int) -> np.ndarray:
  """Mean over finite entries along `axis`, NaN where none is finite (without numpy's warning)."""
  finite = np.isfinite(stack)
  counts = finite.sum(axis=axis)
  totals = np.where(finite, stack, 0.0).sum(axis=axis)
  return np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)


@dataclasses.dataclass(frozen=True)
class Pool:
  """Predictions of one repeat's folds, concatenated (each patient once)."""
  repeat: int
  patient_ids: tuple[str, ...]
  folds: np.ndarray
  labels: np.ndarray
  probabilities: np.ndarray
  slice_labels: np.ndarray
  slice_probabilities: np.ndarray


def pool_repeats(task_runs: TaskRuns) -> list[Pool]:
  """One Pool per repeat that has at least one complete cell, in repeat order."""
  pools = []
  for repeat in task_runs.repeats:
    cells = [task_runs.cells[cell] for cell in sorted(task_runs.cells) if cell[0] == repeat]
    if not cells:
      continue
    pools.append(Pool(
        repeat=repeat,
        patient_ids=tuple(patient_id for cell in cells for patient_id in cell.patient_ids),
        folds=np.concatenate([np.full(len(cell.patient_ids), cell.fold) for cell in cells]),
        labels=np.concatenate([cell.patient_labels for cell in cells]),
        probabilities=np.concatenate([cell.patient_probabilities for cell in cells]),
        slice_labels=np.concatenate([cell.slice_labels for cell in cells]),
        slice_probabilities=np.concatenate([cell.slice_probabilities for cell in cells]),
    ))
  return pools


def own_thresholds(task_runs: TaskRuns) -> dict[Cell, float] | None:
  """Each cell's own threshold (run.json "threshold") when the cells carry their own ("threshold_rule" other
  than "fixed", e.g. inner_youden from inner validation); None when every cell uses the evaluation's threshold.

  Raises:
    RunsError: some cells carry their own threshold and another has none (one line, naming it).
  """
  cells = sorted(task_runs.cells.items())
  if not any(predictions.run_info.get("threshold_rule", "fixed") != "fixed" for _, predictions in cells):
    return None
  thresholds = {}
  for cell, predictions in cells:
    value = predictions.run_info.get("threshold")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
      raise RunsError(f"{predictions.run_json_path} has no threshold in [0, 1] while other cells of task "
                      f"{task_runs.task} carry their own; retrain that cell with the same threshold flags")
    thresholds[cell] = float(value)
  return thresholds


def cell_rows(task_runs: TaskRuns, threshold: float,
              thresholds: Mapping[Cell, float] | None = None) -> list[dict[str, Any]]:
  """One row per (cell, level) with counts and every metric: the content of cell_metrics.csv.

  `thresholds`: each cell's own threshold (own_thresholds), used instead of `threshold` where given.
  """
  rows = []
  for cell, predictions in sorted(task_runs.cells.items()):
    threshold_here = thresholds[cell] if thresholds else threshold
    for level, labels, probabilities in (
        ("patient", predictions.patient_labels, predictions.patient_probabilities),
        ("slice", predictions.slice_labels, predictions.slice_probabilities),
    ):
      counts = metrics_lib.confusion_counts(labels, probabilities, threshold_here)
      row = {
          "task": task_runs.task, "repeat": cell[0], "fold": cell[1], "level": level,
          "n": int(labels.size), "n_positive": int(labels.sum()),
          "true_positive": counts.true_positive, "false_positive": counts.false_positive,
          "true_negative": counts.true_negative, "false_negative": counts.false_negative,
      }
      row.update(metrics_lib.binary_metrics(labels, probabilities, threshold_here))
      rows.append(row)
  return rows


def _summaries_by_metric(metric_rows: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
  return {name: summarize_values([row[name] for row in metric_rows]) for name in metrics_lib.METRIC_NAMES}


def bootstrap_weights(num_patients: int, num_bootstrap: int, seed: int, task: str) -> np.ndarray:
  """[num_bootstrap, num_patients] resampling counts (multinomial, keyed by (seed, task)).

  Every consumer of one task's patients in sorted patient_id order gets the same replicates, so the models'
  CIs and the covariate baselines' CIs come from the same resamples.
  """
  rng = np.random.default_rng([seed, TASK_KEYS[task]])
  if num_patients == 0:
    return np.zeros((num_bootstrap, 0))
  return rng.multinomial(num_patients, np.full(num_patients, 1.0 / num_patients),
                         size=num_bootstrap).astype(np.float64)


def percentile_interval(estimate: float, replicates: np.ndarray) -> dict[str, float]:
  """{estimate, low, high, n_bootstrap_defined}: the 2.5/97.5 percentiles of the defined replicates."""
  replicates = np.asarray(replicates, dtype=np.float64)
  defined = replicates[np.isfinite(replicates)]
  low, high = np.percentile(defined, [2.5, 97.5]) if defined.size else (math.nan, math.nan)
  return {"estimate": estimate, "low": float(low), "high": float(high), "n_bootstrap_defined": int(defined.size)}


def pool_thresholds(task_runs: TaskRuns, pools: Sequence[Pool], threshold: float,
                    thresholds: Mapping[Cell, float] | None) -> tuple[list[Any], list[Any]]:
  """(per pool: the patients' thresholds, per pool: the slices' thresholds): `threshold` itself without own
  thresholds, else arrays holding each prediction's cell's own threshold (in pool_repeats' order)."""
  if not thresholds:
    return [threshold] * len(pools), [threshold] * len(pools)
  patient_level, slice_level = [], []
  for pool in pools:
    patient_level.append(np.asarray([thresholds[(pool.repeat, int(fold))] for fold in pool.folds], np.float64))
    cells = [cell for cell in sorted(task_runs.cells) if cell[0] == pool.repeat]
    slice_level.append(np.concatenate([np.full(task_runs.cells[cell].slice_labels.size, thresholds[cell])
                                       for cell in cells]))
  return patient_level, slice_level


def bootstrap_ci95(task_runs: TaskRuns, pools: Sequence[Pool], threshold: float, num_bootstrap: int,
                   seed: int, thresholds: Mapping[Cell, float] | None = None
                   ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
  """Patient-bootstrap 95 % CIs of the per-cell mean and of the per-repeat (pooled) mean of each metric.

  `thresholds`: each cell's own threshold (own_thresholds), used instead of `threshold` where given.

  Returns:
    (per_cell_ci95, pooled_ci95): metric -> {estimate, low, high, n_bootstrap_defined}. Without bootstrap
    replicates (num_bootstrap == 0) low and high are NaN.
  """
  patient_ids = sorted({patient_id for pool in pools for patient_id in pool.patient_ids})
  index = {patient_id: position for position, patient_id in enumerate(patient_ids)}
  weights = bootstrap_weights(len(patient_ids), num_bootstrap, seed, task_runs.task)

  def replicate_means(groups: Sequence[tuple[Sequence[str], np.ndarray, np.ndarray, Any]]) -> dict[str, np.ndarray]:
    stacks = {name: np.empty((len(groups), num_bootstrap)) for name in metrics_lib.METRIC_NAMES}
    for position, (ids, labels, probabilities, group_threshold) in enumerate(groups):
      columns = [index[patient_id] for patient_id in ids]
      values = metrics_lib.weighted_metrics(labels, probabilities, weights[:, columns], group_threshold)
      for name in metrics_lib.METRIC_NAMES:
        stacks[name][position] = values[name]
    return {name: _nan_mean(stack, axis=0) for name, stack in stacks.items()}

  cell_groups = [(cell.patient_ids, cell.patient_labels, cell.patient_probabilities,
                  thresholds[key] if thresholds else threshold) for key, cell in sorted(task_runs.cells.items())]
  pool_groups = [(pool.patient_ids, pool.labels, pool.probabilities, pool_threshold)
                 for pool, pool_threshold in zip(pools, pool_thresholds(task_runs, pools, threshold, thresholds)[0])]
  point_cells = _summaries_by_metric([metrics_lib.binary_metrics(labels, probabilities, group_threshold)
                                      for _, labels, probabilities, group_threshold in cell_groups])
  point_pools = _summaries_by_metric([metrics_lib.binary_metrics(labels, probabilities, group_threshold)
                                      for _, labels, probabilities, group_threshold in pool_groups])

  def interval(point: Mapping[str, Mapping[str, float]], replicates: Mapping[str, np.ndarray]):
    return {name: percentile_interval(point[name]["mean"], replicates[name]) for name in metrics_lib.METRIC_NAMES}

  return interval(point_cells, replicate_means(cell_groups)), interval(point_pools, replicate_means(pool_groups))


def _as_number(text: str) -> float | None:
  try:
    value = float(text)
  except ValueError:
    return None
  return value if math.isfinite(value) else None


def _format_number(value: float) -> str:
  return f"{value:g}"


def covariate_groups(column: str, values: Mapping[str, str]) -> tuple[str, dict[str, str], list[str]]:
  """Assigns each patient to a subgroup of one covariate.

  Rules (documented in the report):
    a column named `pci` (any case): fixed clinical bins 0, 1-10, 11-20, >20;
    a numeric column with more than MAX_NUMERIC_CATEGORIES distinct values: tertiles of the per-patient
      values (cut points at the 1/3 and 2/3 quantiles, numpy linear interpolation), as intervals
      [min, q1], (q1, q2], (q2, max];
    anything else: one group per distinct value (ordinal words such as none/small/large in clinical order).
  Empty or non-numeric values of a numeric column go to the group "missing".

  Args:
    column: the covariate's column name in patients.csv.
    values: patient_id -> the column's value (a string).

  Returns:
    (rule description, patient_id -> group label, group labels in display order).
  """
  present = {patient_id: text.strip() for patient_id, text in values.items() if text.strip() != ""}
  numbers = {patient_id: _as_number(text) for patient_id, text in present.items()}
  numeric = bool(present) and all(number is not None for number in numbers.values())
  groups: dict[str, str] = {patient_id: MISSING_GROUP for patient_id in values}

  if column.lower() == "pci" and numeric:
    rule = "fixed PCI bins: 0, 1-10, 11-20, >20"
    order = [label for _, label in PCI_BINS]
    for patient_id, number in numbers.items():
      groups[patient_id] = next(label for upper, label in PCI_BINS if number <= upper)
  elif numeric and len(set(numbers.values())) > MAX_NUMERIC_CATEGORIES:
    sorted_values = np.asarray(sorted(numbers.values()))
    first_cut, second_cut = (float(cut) for cut in np.quantile(sorted_values, [1.0 / 3.0, 2.0 / 3.0]))
    minimum, maximum = float(sorted_values[0]), float(sorted_values[-1])
    edges = sorted({first_cut, second_cut} - {maximum})
    bounds = [minimum] + edges + [maximum]
    order = []
    for position in range(len(bounds) - 1):
      opening = "[" if position == 0 else "("
      order.append(f"{opening}{_format_number(bounds[position])}, {_format_number(bounds[position + 1])}]")
    rule = ("tertiles of the per-patient values (cuts at the 1/3 and 2/3 quantiles: "
            f"{', '.join(_format_number(edge) for edge in edges)})")
    for patient_id, number in numbers.items():
      position = int(np.searchsorted(np.asarray(edges), number, side="left"))
      groups[patient_id] = order[position]
  else:
    rule = "categorical: one group per value"
    distinct = sorted(set(present.values()))
    if all(value.lower() in ORDINAL_WORDS for value in distinct):
      distinct.sort(key=lambda value: ORDINAL_WORDS.index(value.lower()))
    else:
      distinct.sort(key=lambda value: (_as_number(value) is None, _as_number(value) or 0.0, value))
    order = distinct
    groups.update(present)
  if MISSING_GROUP in groups.values() and MISSING_GROUP not in order:
    order.append(MISSING_GROUP)
  used = set(groups.values())
  return rule, groups, [label for label in order if label in used]


def subgroup_metrics(task_runs: TaskRuns, pools: Sequence[Pool], threshold: float,
                     thresholds: Mapping[Cell, float] | None = None) -> dict[str, Any]:
  """Per covariate and group: patient counts and the per-repeat (pooled) metrics over the group's patients
  (`thresholds`: each cell's own threshold, used instead of `threshold` where given)."""
  per_pool = pool_thresholds(task_runs, pools, threshold, thresholds)[0]
  evaluated = sorted({patient_id for pool in pools for patient_id in pool.patient_ids})
  labels_by_patient = {patient_id: int(task_runs.patients[patient_id][f"label_{task_runs.task}"])
                       for patient_id in evaluated}
  result: dict[str, Any] = {}
  for column in task_runs.covariate_columns:
    rule, groups, order = covariate_groups(
        column, {patient_id: task_runs.patients[patient_id].get(column) or "" for patient_id in evaluated})
    entries = []
    for label in order:
      members = {patient_id for patient_id in evaluated if groups[patient_id] == label}
      positives = sum(labels_by_patient[patient_id] for patient_id in members)
      per_repeat = []
      for pool, pool_threshold in zip(pools, per_pool):
        mask = np.asarray([patient_id in members for patient_id in pool.patient_ids], dtype=bool)
        if mask.any():
          here = pool_threshold[mask] if isinstance(pool_threshold, np.ndarray) else pool_threshold
          per_repeat.append(metrics_lib.binary_metrics(pool.labels[mask], pool.probabilities[mask], here))
      entries.append({
          "group": label,
          "n_patients": len(members),
          "n_positive": int(positives),
          "n_negative": len(members) - int(positives),
          "metrics": _summaries_by_metric(per_repeat),
      })
    result[column] = {"rule": rule, "groups": entries}
  return result


def youden_summary(pools: Sequence[Pool]) -> dict[str, Any]:
  """The Youden-optimal threshold of each repeat's pooled predictions, summarised (descriptive only)."""
  points = [metrics_lib.youden_threshold(pool.labels, pool.probabilities) for pool in pools]
  return {
      "note": ("descriptive only: chosen on the same held-out predictions it is scored on, so its "
               "sensitivity/specificity are optimistic; decisions use the fixed threshold"),
      "threshold": summarize_values([point.threshold for point in points]),
      "sensitivity": summarize_values([point.sensitivity for point in points]),
      "specificity": summarize_values([point.specificity for point in points]),
      "youden_index": summarize_values([point.youden_index for point in points]),
  }


@dataclasses.dataclass(frozen=True)
class TaskEvaluation:
  """One task's evaluation: the inputs the figures need plus the summary.json entry."""
  task_runs: TaskRuns
  pools: list[Pool]
  rows: list[dict[str, Any]]  # cell_rows: one per (cell, level)
  summary: dict[str, Any]  # JSON-safe (None where a value is undefined)


def evaluate_task(task_runs: TaskRuns, threshold: float, num_bootstrap: int, seed: int) -> TaskEvaluation:
  """Computes every metric of one task; `summary` is its summary.json entry."""
  pools = pool_repeats(task_runs)
  own = own_thresholds(task_runs)
  rows = cell_rows(task_runs, threshold, own)
  patient_rows = [row for row in rows if row["level"] == "patient"]
  slice_rows = [row for row in rows if row["level"] == "slice"]
  patient_thresholds, slice_thresholds = pool_thresholds(task_runs, pools, threshold, own)
  per_repeat = [metrics_lib.binary_metrics(pool.labels, pool.probabilities, here)
                for pool, here in zip(pools, patient_thresholds)]
  per_repeat_slice = [metrics_lib.binary_metrics(pool.slice_labels, pool.slice_probabilities, here)
                      for pool, here in zip(pools, slice_thresholds)]
  per_cell_ci95, pooled_ci95 = bootstrap_ci95(task_runs, pools, threshold, num_bootstrap, seed, own)
  evaluated = sorted({patient_id for pool in pools for patient_id in pool.patient_ids})
  positives = sum(int(task_runs.patients[patient_id][f"label_{task_runs.task}"]) for patient_id in evaluated)
  summary = {
      "task": task_runs.task,
      "partial": task_runs.partial,
      "missing_cells": [{"repeat": repeat, "fold": fold, "name": cell_name((repeat, fold))}
                        for repeat, fold in task_runs.missing_cells],
      "threshold": threshold,
      "decision_rule": "probability >= threshold is a positive prediction",
      "num_bootstrap": num_bootstrap,
      "seed": seed,
      "split_hash": task_runs.split_hash,
      "n_cells": len(task_runs.cells),
      "n_expected_cells": len(task_runs.expected_cells),
      "n_repeats": len(pools),
      "n_folds": task_runs.num_folds,
      "n_patients": len(evaluated),
      "n_positive": positives,
      "n_negative": len(evaluated) - positives,
      "n_slices": int(sum(cell.slice_labels.size for cell in task_runs.cells.values())),
      "per_cell": _summaries_by_metric(patient_rows),
      "per_repeat": _summaries_by_metric(per_repeat),
      "pooled_ci95": pooled_ci95,
      "per_cell_ci95": per_cell_ci95,
      "slice_level": {
          "per_cell": _summaries_by_metric(slice_rows),
          "per_repeat": _summaries_by_metric(per_repeat_slice),
      },
      "youden": youden_summary(pools),
      "subgroups": subgroup_metrics(task_runs, pools, threshold, own),
  }
  if own:
    # The cells' own thresholds (e.g. inner_youden, fitted on each cell's inner patients) replace --threshold.
    rules = sorted({str(cell.run_info.get("threshold_rule")) for cell in task_runs.cells.values()})
    summary.update({
        "threshold": float(np.mean(list(own.values()))),
        "threshold_source": "cells",
        "threshold_rules": rules,
        "cell_thresholds": summarize_values(list(own.values())),
        "decision_rule": ("probability >= the threshold of the cell that predicted it (run.json, rule "
                          f"{', '.join(rules)}); 'threshold' is their mean"),
    })
  return TaskEvaluation(task_runs=task_runs, pools=pools, rows=rows, summary=json_safe(summary))


def json_safe(value: Any) -> Any:
  """Replaces NaN/inf with None and numpy scalars with Python ones, recursively, for strict JSON."""
  if isinstance(value, Mapping):
    return {str(key): json_safe(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(item) for item in value]
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value

