"""Evaluation with the cells' own thresholds (run.json "threshold_rule" other than "fixed"), and the report's
threshold and calibration line. Fake run folders from tests/fake_runs.py."""

import csv
import os

import numpy as np
import pytest

import fake_runs
from pdx_tf import evaluation, io_utils
from pdx_tf.errors import RunsError


def _own_threshold(repeat, fold):
  return 0.3 + 0.1 * fold + 0.05 * repeat


def _give_cells_thresholds(root, num_repeats=2, num_folds=3, skip=()):
  for repeat in range(num_repeats):
    for fold in range(num_folds):
      if (repeat, fold) in skip:
        continue
      path = os.path.join(fake_runs.cell_folder(root, "p", repeat, fold), "run.json")
      run = io_utils.read_json(path)
      run.update(threshold=_own_threshold(repeat, fold), threshold_rule="inner_youden", calibration=None)
      io_utils.atomic_write_json(path, run)


def _read_csv(path):
  with open(path) as handle:
    return list(csv.DictReader(handle))


def _evaluate(root, output):
  return evaluation.evaluate_runs(evaluation.EvaluateConfig(runs_dir=str(root), output_dir=str(output),
                                                            tasks=("p",), num_bootstrap=0))


def test_cells_own_thresholds_replace_the_evaluation_threshold(tmp_path):
  root = str(tmp_path / "runs")
  fake_runs.write_fake_runs(root, tasks=("p",))
  _give_cells_thresholds(root)
  summary = _evaluate(root, tmp_path / "E")["p"]
  # Independent: counts from each cell's own patient_predictions.csv at that cell's threshold.
  expected_counts, pooled = {}, {0: [], 1: []}
  for repeat in range(2):
    for fold in range(3):
      rows = _read_csv(os.path.join(fake_runs.cell_folder(root, "p", repeat, fold), "patient_predictions.csv"))
      decided = [(int(row["label"]), float(row["probability"]) >= _own_threshold(repeat, fold)) for row in rows]
      expected_counts[(repeat, fold)] = (sum(label and hit for label, hit in decided),
                                         sum(not label and hit for label, hit in decided))
      pooled[repeat].extend(decided)
  cell_metrics = [row for row in _read_csv(tmp_path / "E" / "cell_metrics.csv") if row["level"] == "patient"]
  assert {(int(row["repeat"]), int(row["fold"])): (int(row["true_positive"]), int(row["false_positive"]))
          for row in cell_metrics} == expected_counts
  sensitivities = [np.mean([hit for label, hit in pooled[repeat] if label]) for repeat in (0, 1)]
  assert summary["per_repeat"]["sensitivity"]["mean"] == pytest.approx(np.mean(sensitivities))
  assert summary["threshold_source"] == "cells" and summary["threshold_rules"] == ["inner_youden"]
  assert summary["threshold"] == pytest.approx(np.mean([_own_threshold(r, f) for r in range(2) for f in range(3)]))
  for row in _read_csv(tmp_path / "E" / "patient_predictions.csv"):
    threshold = _own_threshold(int(row["repeat"]), int(row["fold"]))
    assert int(row["predicted"]) == int(float(row["probability"]) >= threshold)
  report = (tmp_path / "E" / "report.md").read_text()
  assert "threshold: each cell's own (inner_youden; mean" in report
  slope = summary["calibration"]["slope"]["mean"]
  assert f"calibration slope {slope:.3f}, intercept {summary['calibration']['intercept']['mean']:.3f}" in report


def test_without_own_thresholds_the_evaluation_threshold_is_used(tmp_path):
  root = str(tmp_path / "runs")
  fake_runs.write_fake_runs(root, tasks=("p",))
  summary = _evaluate(root, tmp_path / "E")["p"]
  assert summary["threshold"] == 0.5 and "threshold_source" not in summary
  assert "threshold 0.5; calibration slope" in (tmp_path / "E" / "report.md").read_text()


def test_a_cell_without_its_own_threshold_among_cells_with_one_is_one_line(tmp_path):
  root = str(tmp_path / "runs")
  fake_runs.write_fake_runs(root, tasks=("p",))
  _give_cells_thresholds(root, skip=((1, 2),))
  with pytest.raises(RunsError) as error:
    _evaluate(root, tmp_path / "E")
  assert "\n" not in str(error.value) and "r01_f02" in str(error.value)
