"""Tests of pdx_tf.evaluation.pci on a hand-written regions grid (2 repeats x 2 folds, 4 patients): the out-of-fold
mean over repeats, sensitivity/specificity at each cell's own thresholds, AUCs against scikit-learn, the PCI, and
one line for a missing cell. Every expectation is computed here from the written numbers."""

import json
import os

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from pdx_tf import io_utils
from pdx_tf.errors import RunsError
from pdx_tf.evaluation import pci

PATIENTS = ["a", "b", "c", "d"]
# Folds: repeat 0 tests (a, b) then (c, d); repeat 1 tests (a, c) then (b, d).
FOLDS = {0: [["a", "b"], ["c", "d"]], 1: [["a", "c"], ["b", "d"]]}
SCORES = {"a": [2] * 9 + [1, 0, 0, 0], "b": [0] * 13, "c": [1] * 9 + [0, 0, 0, -1], "d": [3] * 9 + [2, 2, 1, 1]}


def _probability(repeat, patient, region):
  return round(0.1 + 0.2 * PATIENTS.index(patient) + 0.05 * repeat + 0.01 * region, 4)


def _threshold(repeat, fold, region):
  return 0.2 + 0.4 * fold + 0.02 * repeat + 0.001 * region  # far from 0.5 both ways, so a fixed 0.5 differs


def _scale(repeat, fold):
  return [1.0 + 0.5 * fold + 0.25 * repeat] * 13


def _write_grid(root, skip=()):
  folds = []
  for repeat, tests in FOLDS.items():
    folds.append({"repeat": repeat, "folds": [{"fold": fold, "test": test,
                                                 "train": [p for p in PATIENTS if p not in test]}
                                                for fold, test in enumerate(tests)]})
  io_utils.atomic_write_json(os.path.join(root, "splits.json"), {"task": "regions", "repeats": folds})
  for repeat, tests in FOLDS.items():
    for fold, test in enumerate(tests):
      if (repeat, fold) in skip:
        continue
      folder = os.path.join(root, "cells", f"r{repeat:02d}_f{fold:02d}")
      rows = [[p, r, "" if SCORES[p][r] < 0 else int(SCORES[p][r] > 0), "" if SCORES[p][r] < 0 else SCORES[p][r],
               _probability(repeat, p, r)] for p in test for r in range(13)]
      io_utils.atomic_write_csv(os.path.join(folder, "region_predictions.csv"),
                                ["patient_id", "region", "label", "score", "probability"], rows)
      io_utils.atomic_write_csv(os.path.join(folder, "derived_predictions.csv"),
                                ["patient_id", "task", "label", "probability"],
                                [[p, "p", int(max(SCORES[p]) > 0), _probability(repeat, p, 12)] for p in test])
      io_utils.atomic_write_json(os.path.join(folder, "run.json"), {
          "task": "regions", "repeat": repeat, "fold": fold,
          "thresholds": [_threshold(repeat, fold, r) for r in range(13)], "pci_scale": _scale(repeat, fold)})


def test_region_evaluation_by_hand(tmp_path):
  _write_grid(str(tmp_path))
  summary, rows = pci.evaluate_regions(str(tmp_path), num_bootstrap=50, seed=1)
  mean = {(p, r): np.mean([_probability(repeat, p, r) for repeat in FOLDS]) for p in PATIENTS for r in range(13)}
  assert [row[:2] for row in rows] == [[p, r] for p in PATIENTS for r in range(13)]
  for patient_id, region, label, probability in rows:
    assert float(probability) == pytest.approx(mean[(patient_id, region)])
    assert label == ("" if SCORES[patient_id][region] < 0 else int(SCORES[patient_id][region] > 0))
  for region in range(13):
    recorded = [p for p in PATIENTS if SCORES[p][region] >= 0]
    labels = [int(SCORES[p][region] > 0) for p in recorded]
    expected = (roc_auc_score(labels, [mean[(p, region)] for p in recorded]) if len(set(labels)) == 2 else None)
    assert summary["regions"][region]["auc"] == (pytest.approx(expected) if expected is not None else None)
    # Sensitivity: per repeat, the share of positives at or above their own cell's threshold; then the mean.
    per_repeat = []
    for repeat, tests in FOLDS.items():
      decisions = [_probability(repeat, p, region) >= _threshold(repeat, fold, region)
                   for fold, test in enumerate(tests) for p in test if SCORES[p][region] > 0]
      if decisions:
        per_repeat.append(np.mean(decisions))
    if per_repeat:
      assert summary["regions"][region]["sensitivity"] == pytest.approx(np.mean(per_repeat))
  # Predicted PCI: per cell probability x that cell's scale, then the mean over repeats; only fully recorded
  # patients (not c) count.
  predicted = {p: np.mean([sum(_probability(repeat, p, r) * _scale(repeat, fold)[r] for r in range(13))
                           for repeat, tests in FOLDS.items() for fold, test in enumerate(tests) if p in test])
               for p in PATIENTS}
  complete = ["a", "b", "d"]
  assert summary["pci"]["n_patients"] == 3
  assert summary["pci"]["mae"] == pytest.approx(np.mean([abs(predicted[p] - sum(SCORES[p])) for p in complete]))
  assert summary["pci"]["spearman"] == pytest.approx(
      stats.spearmanr([predicted[p] for p in complete], [sum(SCORES[p]) for p in complete]).statistic)
  assert summary["n_repeats"] == 2 and summary["n_cells"] == 4 and not summary["partial"]
  values = [entry["auc"] for entry in summary["regions"] if entry["auc"] is not None]
  assert summary["macro_auc"] == pytest.approx(np.mean(values))


def test_a_missing_cell_is_one_line_unless_partial(tmp_path):
  _write_grid(str(tmp_path), skip=((1, 1),))
  with pytest.raises(RunsError, match=r"1 of 4 cells have no complete run.json .* r01_f01"):
    pci.evaluate_regions(str(tmp_path), num_bootstrap=0)
  summary, _ = pci.evaluate_regions(str(tmp_path), num_bootstrap=0, allow_partial=True)
  assert summary["partial"] and summary["n_cells"] == 3
