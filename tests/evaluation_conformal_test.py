"""Tests of the conformal check in evaluation (pdx_tf/evaluation/conformal_evaluation.py, evaluator wiring)."""

import csv
import json
import math
import os

import numpy as np
import pytest

from pdx_tf import evaluation
from pdx_tf.evaluation import conformal_evaluation, runs as runs_lib
from tests import fake_runs


def _reference_bound(scores, alpha):
  ordered = sorted(scores)
  k = math.ceil((len(ordered) + 1) * (1 - alpha) - 1e-9)
  return ordered[k - 1] if k <= len(ordered) else math.inf


def _read_rows(path):
  with open(path, newline="") as handle:
    return list(csv.DictReader(handle))


def _expected_answers(runs_dir, task, alpha):
  """Each out-of-fold row's answer, recomputed from the cells' stored CSVs with the documented rule: calibrate cell
  (r, f) on the rows of repeat r's other folds (none of its own test patients), q_y as documented."""
  rows = []
  for cell_dir in sorted(os.listdir(os.path.join(runs_dir, task, "cells"))):
    repeat, fold = int(cell_dir[1:3]), int(cell_dir[5:7])
    for row in _read_rows(os.path.join(runs_dir, task, "cells", cell_dir, "patient_predictions.csv")):
      rows.append((repeat, fold, row["patient_id"], int(row["label"]), float(row["probability"])))
  answers, sets = {}, {}
  for repeat, fold, patient, label, probability in rows:
    own = {r[2] for r in rows if r[0] == repeat and r[1] == fold}
    calibration = [r for r in rows if r[0] == repeat and r[1] != fold and r[2] not in own]
    q0 = _reference_bound([r[4] for r in calibration if r[3] == 0], alpha)
    q1 = _reference_bound([1 - r[4] for r in calibration if r[3] == 1], alpha)
    negative, positive = probability <= q0, 1 - probability <= q1
    answers[(repeat, fold, patient)] = ("negative" if negative and not positive else
                                        "positive" if positive and not negative else "uncertain")
    sets[(repeat, fold, patient)] = (negative, positive)
  return answers, sets, rows


@pytest.mark.parametrize("alpha", [0.1, 0.3])
def test_evaluate_writes_the_sets_summary_and_figure(tmp_path, alpha):
  runs_dir = str(tmp_path / "runs")
  fake_runs.write_fake_runs(runs_dir, tasks=("p",), num_repeats=2, num_folds=4, num_patients=48)
  output = str(tmp_path / "evaluation")
  summary = evaluation.evaluate_runs(evaluation.EvaluateConfig(runs_dir=runs_dir, output_dir=output,
                                                               num_bootstrap=50, conformal_alpha=alpha))
  expected, sets, rows = _expected_answers(runs_dir, "p", alpha)
  written = _read_rows(os.path.join(output, "patient_predictions.csv"))
  assert len(written) == len(rows)
  for row in written:
    assert row["conformal_set"] == expected[(int(row["repeat"]), int(row["fold"]), row["patient_id"])]
    assert float(row["alpha"]) == alpha
  entry = json.load(open(os.path.join(output, "summary.json")))["p"]["conformal"]
  assert entry == summary["p"]["conformal"]
  # Coverage and shares recomputed from the written answers and the labels.
  labels = {(int(r["repeat"]), int(r["fold"]), r["patient_id"]): int(r["label"]) for r in written}
  covered = [sets[key][label] for key, label in labels.items()]
  assert entry["n_empty"] == sum(not any(pair) for pair in sets.values())
  assert entry["coverage"]["estimate"] == pytest.approx(np.mean(covered))
  positives = [c for (key, label), c in zip(labels.items(), covered) if label == 1]
  assert entry["coverage_positive"]["estimate"] == pytest.approx(np.mean(positives))
  uncertain = [expected[key] == "uncertain" for key in labels]
  assert entry["uncertain_share"]["estimate"] == pytest.approx(np.mean(uncertain))
  assert entry["coverage"]["low"] <= entry["coverage"]["estimate"] <= entry["coverage"]["high"]
  answered = [(expected[key], label) for key, label in labels.items() if expected[key] != "uncertain"]
  assert entry["answered"]["accuracy"] == pytest.approx(
      np.mean([answer == ("negative", "positive")[label] for answer, label in answered]))
  assert entry["sd_error_auc"] is not None  # two repeats: an SD a patient
  assert os.path.exists(os.path.join(output, "figures", "conformal.png"))
  report = open(os.path.join(output, "report.md")).read()
  assert "Conformal answers at alpha" in report and "figures/conformal.png" in report


def test_evaluate_without_alpha_leaves_the_outputs_as_before(tmp_path):
  runs_dir = str(tmp_path / "runs")
  fake_runs.write_fake_runs(runs_dir, tasks=("p",), num_repeats=1, num_folds=3, num_patients=18)
  output = str(tmp_path / "evaluation")
  summary = evaluation.evaluate_runs(evaluation.EvaluateConfig(runs_dir=runs_dir, output_dir=output,
                                                               num_bootstrap=0))
  assert "conformal" not in summary["p"]
  header = open(os.path.join(output, "patient_predictions.csv")).readline().strip().split(",")
  assert header == list(evaluation.evaluator.PATIENT_PREDICTIONS_HEADER)


def test_evaluate_uses_the_alpha_the_runs_were_trained_with(tmp_path):
  runs_dir = str(tmp_path / "runs")
  fake_runs.write_fake_runs(runs_dir, tasks=("p",), num_repeats=1, num_folds=3, num_patients=18)
  for cell_dir in os.listdir(os.path.join(runs_dir, "p", "cells")):
    path = os.path.join(runs_dir, "p", "cells", cell_dir, "run.json")
    document = json.load(open(path))
    document["config"]["conformal_alpha"] = 0.2
    json.dump(document, open(path, "w"))
  summary = evaluation.evaluate_runs(evaluation.EvaluateConfig(runs_dir=runs_dir, output_dir=str(tmp_path / "e"),
                                                               num_bootstrap=0))
  assert summary["p"]["conformal"]["alpha"] == 0.2
  # --conformal_alpha re-derives the sets at another alpha from the same runs.
  summary = evaluation.evaluate_runs(evaluation.EvaluateConfig(runs_dir=runs_dir, output_dir=str(tmp_path / "f"),
                                                               num_bootstrap=0, conformal_alpha=0.4))
  assert summary["p"]["conformal"]["alpha"] == 0.4


def test_ece_auc_and_risk_coverage_match_hand_computed_values():
  labels = np.array([0, 0, 1, 1])
  probabilities = np.array([0.05, 0.15, 0.12, 0.95])
  # Bins of 0.1: [0.05] -> |0 - 0.05|; [0.15, 0.12] -> |0 + 1 - 0.27|; [0.95] -> |1 - 0.95|; total / 4.
  assert conformal_evaluation.expected_calibration_error(labels, probabilities) == pytest.approx(
      (0.05 + 0.73 + 0.05) / 4)
  # Scores of positives {0.3, 0.8} vs negatives {0.1, 0.3}: wins 1 + 0.5 + 1 + 1 = 3.5 of 4.
  assert conformal_evaluation.weighted_auc(np.array([True, True, False, False]),
                                           np.array([0.3, 0.8, 0.1, 0.3])) == pytest.approx(3.5 / 4)
  curve = conformal_evaluation.risk_coverage(np.array([1, 0, 1, 1]), np.array([0.9, 0.1, 0.8, 0.7]), points=4)
  assert curve["coverage"] == [1.0, 0.75, 0.5, 0.25]
  assert curve["selective_accuracy"] == [0.75, 1.0, 1.0, 1.0]


def test_bad_conformal_alpha_is_refused():
  with pytest.raises(ValueError, match="conformal_alpha"):
    evaluation.EvaluateConfig(runs_dir="r", output_dir="o", conformal_alpha=1.5)


def test_runs_alpha_refuses_cells_that_disagree(tmp_path):
  runs_dir = str(tmp_path / "runs")
  fake_runs.write_fake_runs(runs_dir, tasks=("p",), num_repeats=1, num_folds=2, num_patients=8)
  for number, cell_dir in enumerate(sorted(os.listdir(os.path.join(runs_dir, "p", "cells")))):
    path = os.path.join(runs_dir, "p", "cells", cell_dir, "run.json")
    document = json.load(open(path))
    document["config"]["conformal_alpha"] = 0.1 * (number + 1)
    json.dump(document, open(path, "w"))
  task_runs = runs_lib.load_runs(runs_dir, ("p",))["p"]
  with pytest.raises(ValueError, match="different conformal_alpha"):
    conformal_evaluation.runs_alpha(task_runs)
