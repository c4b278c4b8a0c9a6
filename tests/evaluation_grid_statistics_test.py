"""Tests for pdx_tf.evaluation.grid_statistics: exact grid statistics, bootstrap CIs, subgroup binning."""

import math
import os
import statistics
import sys

import numpy as np
import pytest
from sklearn import metrics as sklearn_metrics

sys.path.insert(0, os.path.dirname(__file__))
import fake_runs  # noqa: E402  pylint: disable=wrong-import-position

from pdx_tf import io_utils  # noqa: E402
from pdx_tf.evaluation import grid_statistics, runs  # noqa: E402

MISSED_POSITIVE = "pt000"  # predicted 0.2 in repeat 0 only: one false negative
FLAGGED_NEGATIVE = "pt001"  # predicted 0.7 in every repeat: one false positive per repeat


def _fixed_probability(task, repeat, fold, patient_id, label):
  del task, fold
  if patient_id == MISSED_POSITIVE and repeat == 0:
    return 0.2
  if patient_id == FLAGGED_NEGATIVE:
    return 0.7
  return 0.9 if label else 0.1


@pytest.fixture(name="grid", scope="module")
def fixture_grid(tmp_path_factory):
  """A 2-repeat x 3-fold grid of 12 patients (6 positive for p, 3 for sb) with fixed predictions."""
  root = str(tmp_path_factory.mktemp("grid"))
  splits = fake_runs.write_fake_runs(root, num_repeats=2, num_folds=3, num_patients=12,
                                     probability_fn=_fixed_probability)
  return runs.load_runs(root), splits


def test_summarize_values_exact():
  summary = grid_statistics.summarize_values([0.5, float("nan"), 1.0, 0.0, 0.25])
  assert summary["n"] == 4
  assert summary["mean"] == pytest.approx(0.4375)
  assert summary["sd"] == pytest.approx(statistics.stdev([0.5, 1.0, 0.0, 0.25]))
  assert summary["median"] == pytest.approx(0.375)
  assert summary["p2_5"] == pytest.approx(0.0 + 0.025 * 3 * 0.25)  # linear interpolation, 0..0.25
  assert summary["p97_5"] == pytest.approx(0.5 + 0.925 * 0.5)  # position 2.925 between 0.5 and 1.0
  empty = grid_statistics.summarize_values([float("nan")])
  assert empty["n"] == 0 and math.isnan(empty["mean"])
  single = grid_statistics.summarize_values([0.3])
  assert single["mean"] == 0.3 and math.isnan(single["sd"])


def test_per_cell_statistics_match_hand_counts(grid):
  task_runs, splits = grid
  evaluation = grid_statistics.evaluate_task(task_runs["p"], 0.5, num_bootstrap=0, seed=0)
  expected = {"sensitivity": [], "specificity": [], "accuracy": []}
  for repeat_entry in splits["p"]["repeats"]:
    for fold_entry in repeat_entry["folds"]:
      test = fold_entry["test"]
      positives = sum(int(patient[2:]) % 2 == 0 for patient in test)  # fake cohort: even ids positive
      negatives = len(test) - positives
      false_negatives = int(repeat_entry["repeat"] == 0 and MISSED_POSITIVE in test)
      false_positives = int(FLAGGED_NEGATIVE in test)
      expected["sensitivity"].append((positives - false_negatives) / positives)
      expected["specificity"].append((negatives - false_positives) / negatives)
      expected["accuracy"].append((len(test) - false_negatives - false_positives) / len(test))
  summary = evaluation.summary
  assert summary["n_cells"] == 6
  for metric, values in expected.items():
    assert summary["per_cell"][metric]["n"] == 6
    assert summary["per_cell"][metric]["mean"] == pytest.approx(statistics.fmean(values)), metric
    assert summary["per_cell"][metric]["sd"] == pytest.approx(statistics.stdev(values)), metric
    assert summary["per_cell"][metric]["median"] == pytest.approx(statistics.median(values)), metric


def test_per_repeat_pooled_statistics_by_hand(grid):
  summary = grid_statistics.evaluate_task(grid[0]["p"], 0.5, num_bootstrap=0, seed=0).summary
  per_repeat = summary["per_repeat"]
  # Repeat 0: 5/6 positives found, 5/6 negatives cleared; repeat 1: 6/6 and 5/6.
  assert per_repeat["sensitivity"]["mean"] == pytest.approx((5 / 6 + 1) / 2)
  assert per_repeat["sensitivity"]["sd"] == pytest.approx((1 / 6) / math.sqrt(2))
  assert per_repeat["specificity"]["mean"] == pytest.approx(5 / 6)
  assert per_repeat["specificity"]["sd"] == pytest.approx(0.0)
  assert per_repeat["accuracy"]["mean"] == pytest.approx((10 / 12 + 11 / 12) / 2)
  # AUC repeat 0: five positives at 0.9 beat all 6 negatives (30 pairs), 0.2 beats the five at 0.1 -> 35/36.
  assert per_repeat["auc"]["mean"] == pytest.approx((35 / 36 + 1.0) / 2)
  brier_repeat_0 = (10 * 0.1**2 + 0.8**2 + 0.7**2) / 12
  brier_repeat_1 = (11 * 0.1**2 + 0.7**2) / 12
  assert per_repeat["brier"]["mean"] == pytest.approx((brier_repeat_0 + brier_repeat_1) / 2)


def test_undefined_cell_values_are_excluded_and_counted(grid):
  task_runs, splits = grid
  summary = grid_statistics.evaluate_task(task_runs["sb"], 0.5, num_bootstrap=0, seed=0).summary
  sensitivities = []
  for repeat_entry in splits["sb"]["repeats"]:
    for fold_entry in repeat_entry["folds"]:
      positives = [patient for patient in fold_entry["test"] if int(patient[2:]) % 4 == 0]
      if positives:  # a fold without sb positives has no sensitivity
        missed = int(repeat_entry["repeat"] == 0 and MISSED_POSITIVE in positives)
        sensitivities.append((len(positives) - missed) / len(positives))
  assert summary["per_cell"]["sensitivity"]["n"] == len(sensitivities)
  assert summary["per_cell"]["sensitivity"]["mean"] == pytest.approx(statistics.fmean(sensitivities))
  assert summary["per_cell"]["specificity"]["n"] == 6


def test_cell_rows_hold_counts_for_both_levels(grid):
  rows = grid_statistics.cell_rows(grid[0]["p"], 0.5)
  assert len(rows) == 12 and {row["level"] for row in rows} == {"patient", "slice"}
  patient_rows = [row for row in rows if row["level"] == "patient"]
  assert sum(row["false_negative"] for row in patient_rows) == 1
  assert sum(row["false_positive"] for row in patient_rows) == 2
  assert sum(row["n"] for row in patient_rows) == 24


def test_bootstrap_is_deterministic_and_contains_the_estimate():
  import tempfile  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as root:
    fake_runs.write_fake_runs(root, tasks=("p",), num_repeats=3, num_folds=3, num_patients=30)
    task_runs = runs.load_runs(root)["p"]
  pools = grid_statistics.pool_repeats(task_runs)
  first = grid_statistics.bootstrap_ci95(task_runs, pools, 0.5, num_bootstrap=200, seed=5)
  again = grid_statistics.bootstrap_ci95(task_runs, pools, 0.5, num_bootstrap=200, seed=5)
  other = grid_statistics.bootstrap_ci95(task_runs, pools, 0.5, num_bootstrap=200, seed=6)
  assert first == again
  assert first != other
  for intervals in first:
    for metric, interval in intervals.items():
      assert interval["low"] <= interval["estimate"] <= interval["high"], metric
      assert interval["low"] < interval["high"], metric
      assert interval["n_bootstrap_defined"] == 200, metric


def test_no_bootstrap_gives_undefined_intervals(grid):
  summary = grid_statistics.evaluate_task(grid[0]["p"], 0.5, num_bootstrap=0, seed=0).summary
  assert summary["pooled_ci95"]["accuracy"]["low"] is None
  assert summary["pooled_ci95"]["accuracy"]["estimate"] == pytest.approx(summary["per_repeat"]["accuracy"]["mean"])


def test_pci_uses_fixed_clinical_bins():
  values = {"a": "0", "b": "5", "c": "10", "d": "11", "e": "20", "f": "21", "g": "", "h": "10.5"}
  rule, groups, order = grid_statistics.covariate_groups("PCI", values)
  assert "0, 1-10, 11-20, >20" in rule
  assert groups == {"a": "0", "b": "1-10", "c": "1-10", "d": "11-20", "e": "11-20", "f": ">20",
                    "g": "missing", "h": "11-20"}
  assert order == ["0", "1-10", "11-20", ">20", "missing"]


def test_other_numeric_columns_use_tertiles():
  values = {f"p{value}": str(value) for value in range(1, 10)}
  rule, groups, order = grid_statistics.covariate_groups("age", values)
  assert "tertiles" in rule
  # Cuts at the 1/3 and 2/3 quantiles of 1..9: 3.667 and 6.333.
  assert order == ["[1, 3.66667]", "(3.66667, 6.33333]", "(6.33333, 9]"]
  assert [groups[f"p{value}"] for value in range(1, 10)] == [order[0]] * 3 + [order[1]] * 3 + [order[2]] * 3


def test_categorical_columns_in_clinical_or_natural_order():
  _, groups, order = grid_statistics.covariate_groups("ascites", {"a": "large", "b": "none", "c": "small", "d": "none"})
  assert order == ["none", "small", "large"] and groups["a"] == "large"
  _, _, order = grid_statistics.covariate_groups("stage", {"a": "2", "b": "10", "c": "1"})
  assert order == ["1", "2", "10"]  # few distinct numbers: categories, in numeric order


def test_subgroup_counts_add_up(grid):
  task_runs = grid[0]["p"]
  subgroups = grid_statistics.evaluate_task(task_runs, 0.5, num_bootstrap=0, seed=0).summary["subgroups"]
  assert set(subgroups) == {"ascites", "pci", "site"}
  for entry in subgroups.values():
    assert sum(group["n_patients"] for group in entry["groups"]) == 12
    assert sum(group["n_positive"] for group in entry["groups"]) == 6
  pci_groups = {group["group"]: group for group in subgroups["pci"]["groups"]}
  assert pci_groups["0"]["n_positive"] == 0 and pci_groups["0"]["n_patients"] == 6
  # Only negatives: specificity over repeats is defined, sensitivity is not.
  assert pci_groups["0"]["metrics"]["sensitivity"]["n"] == 0
  assert pci_groups["0"]["metrics"]["specificity"]["mean"] == pytest.approx(5 / 6)


def test_json_safe_replaces_nan():
  assert grid_statistics.json_safe({"a": [float("nan"), np.float64(0.5), float("inf")], "b": np.int64(3)}) == {
      "a": [None, 0.5, None], "b": 3}


def _reverse_patient_rows(root):
  """Writes every cell's patient_predictions.csv in reverse (descending patient_id) row order."""
  for folder, _, names in os.walk(root):
    if "patient_predictions.csv" in names:
      path = os.path.join(folder, "patient_predictions.csv")
      rows = io_utils.read_csv(path)
      header = list(rows[0])
      io_utils.atomic_write_csv(path, header, ([row[column] for column in header] for row in reversed(rows)))


def _resampled_metrics(counts_by_patient, patient_ids, labels, probabilities):
  """Accuracy, sensitivity and AUC of one bootstrap replicate: each patient repeated by its count (scikit-learn)."""
  repeats = np.asarray([counts_by_patient[patient_id] for patient_id in patient_ids], dtype=int)
  labels, probabilities = np.repeat(labels, repeats), np.repeat(probabilities, repeats)
  predicted = (probabilities >= 0.5).astype(int)
  both = len(set(labels.tolist())) == 2
  return {
      "accuracy": sklearn_metrics.accuracy_score(labels, predicted) if labels.size else math.nan,
      "sensitivity": sklearn_metrics.recall_score(labels, predicted) if labels.sum() else math.nan,
      "auc": sklearn_metrics.roc_auc_score(labels, probabilities) if both else math.nan,
  }


def test_bootstrap_resamples_patients_by_id_not_by_row_position(tmp_path):
  """Rows in descending patient order; the replicates are rebuilt here by patient ID (sorted IDs index the counts,
  as bootstrap_weights documents), each resample expanded and scored by scikit-learn. A bootstrap that weighted row
  positions instead of patients would pair counts with the wrong patients and miss these intervals."""
  fake_runs.write_fake_runs(str(tmp_path), tasks=("p",), num_repeats=2, num_folds=3, num_patients=18)
  _reverse_patient_rows(str(tmp_path))
  task_runs = runs.load_runs(str(tmp_path))["p"]
  first_cell = task_runs.cells[(0, 0)]
  assert list(first_cell.patient_ids) == sorted(first_cell.patient_ids, reverse=True)
  pools = grid_statistics.pool_repeats(task_runs)
  num_bootstrap, seed = 40, 11
  per_cell, pooled = grid_statistics.bootstrap_ci95(task_runs, pools, 0.5, num_bootstrap=num_bootstrap, seed=seed)

  everyone = sorted({patient_id for pool in pools for patient_id in pool.patient_ids})
  weights = grid_statistics.bootstrap_weights(len(everyone), num_bootstrap, seed, "p")
  groups = {
      "cells": [(cell.patient_ids, cell.patient_labels, cell.patient_probabilities)
                for _, cell in sorted(task_runs.cells.items())],
      "pools": [(pool.patient_ids, pool.labels, pool.probabilities) for pool in pools],
  }
  for name, found in (("cells", per_cell), ("pools", pooled)):
    replicates = {metric: [] for metric in ("accuracy", "sensitivity", "auc")}
    for row in weights:
      counts = dict(zip(everyone, row))
      values = [_resampled_metrics(counts, *group) for group in groups[name]]
      for metric, series in replicates.items():
        defined = [value[metric] for value in values if not math.isnan(value[metric])]
        series.append(statistics.fmean(defined) if defined else math.nan)
    for metric, series in replicates.items():
      series = np.asarray(series)
      low, high = np.percentile(series[np.isfinite(series)], [2.5, 97.5])
      assert found[metric]["low"] == pytest.approx(low), (name, metric)
      assert found[metric]["high"] == pytest.approx(high), (name, metric)
