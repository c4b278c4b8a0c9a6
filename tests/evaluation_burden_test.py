"""pdx_tf/evaluation/burden.py: metrics by disease burden, checked against scikit-learn and a bootstrap built by
patient ID (not by row position)."""

import os

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import fake_runs
from pdx_tf import evaluation
from pdx_tf.evaluation import burden, grid_statistics

NUM_BOOTSTRAP = 200


def _probability(task, repeat, fold, patient_id, label):
  """Finds heavy disease and misses light disease: a positive's score rises with its PCI (patients.csv)."""
  del task, fold
  pci = PCI[patient_id]
  jitter = (int(patient_id[2:]) * 7919 + repeat * 104729) % 97 / 970.0
  return 0.3 + jitter if label == 0 else min(0.99, 0.05 + pci / 40.0 + jitter)


PCI = {}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("burden_runs"))
  PCI.update({row["patient_id"]: int(row["pci"]) for row in fake_runs.make_patients(36, seed=3)})
  fake_runs.write_fake_runs(root, tasks=("p",), num_repeats=2, num_folds=3, num_patients=36, seed=3,
                            probability_fn=_probability)
  summary = evaluation.evaluate_runs(evaluation.EvaluateConfig(
      runs_dir=root, output_dir=os.path.join(root, "eval"), tasks=("p",), num_bootstrap=NUM_BOOTSTRAP, seed=5))
  return root, summary


def _pooled(root):
  """(repeat -> {patient_id: probability}, patients table) read straight from the fake CSVs."""
  rows = {}
  for name in sorted(os.listdir(os.path.join(root, "p", "cells"))):
    repeat = int(name[1:3])
    with open(os.path.join(root, "p", "cells", name, "patient_predictions.csv")) as handle:
      next(handle)
      for line in handle:
        patient_id, _, probability = line.strip().split(",")[:3]
        rows.setdefault(repeat, {})[patient_id] = float(probability)
  patients = {row["patient_id"]: row for row in fake_runs.make_patients(36, seed=3)}
  return rows, patients


def test_strata_are_tertiles_of_the_positives_and_each_is_scored_against_all_negatives(evaluated):
  root, summary = evaluated
  entry = summary["p"]["burden"]
  by_repeat, patients = _pooled(root)
  positives = {pid: float(row["pci"]) for pid, row in patients.items() if row["label_p"] == "1"}
  negatives = sorted(pid for pid, row in patients.items() if row["label_p"] == "0")
  q1, q2 = np.quantile(sorted(positives.values()), [1 / 3, 2 / 3])
  expected = {"low": {p for p, v in positives.items() if v <= q1},
              "middle": {p for p, v in positives.items() if q1 < v <= q2},
              "high": {p for p, v in positives.items() if v > q2}}
  assert entry["column"] == "pci"
  assert [s["stratum"] for s in entry["strata"]] == ["low", "middle", "high"]
  for stratum in entry["strata"]:
    members = expected[stratum["stratum"]]
    assert stratum["n_positive"] == len(members) and stratum["n_negative"] == len(negatives)
    aucs, sensitivities = [], []
    for probabilities in by_repeat.values():
      ids = sorted(members) + negatives
      labels = [1] * len(members) + [0] * len(negatives)
      scores = [probabilities[pid] for pid in ids]
      aucs.append(roc_auc_score(labels, scores))
      sensitivities.append(np.mean([probabilities[pid] >= 0.5 for pid in members]))
    assert stratum["metrics"]["auc"]["estimate"] == pytest.approx(np.mean(aucs), abs=1e-9)
    assert stratum["metrics"]["sensitivity"]["estimate"] == pytest.approx(np.mean(sensitivities), abs=1e-9)
  # The fake model finds heavy disease: the high stratum ranks above the low one.
  low, high = entry["strata"][0]["metrics"]["auc"], entry["strata"][-1]["metrics"]["auc"]
  assert low["estimate"] < high["estimate"]


def test_bootstrap_resamples_patients_by_id_whatever_the_row_order(evaluated):
  """The CI of a stratum equals one rebuilt here from the evaluation's weights indexed by sorted patient ID, with
  the repeats' rows in their (fold) order, not sorted: resampling row positions would differ."""
  root, summary = evaluated
  entry = summary["p"]["burden"]
  by_repeat, patients = _pooled(root)
  evaluated_ids = sorted(patients)
  weights = grid_statistics.bootstrap_weights(len(evaluated_ids), NUM_BOOTSTRAP, 5, "p")
  column = {pid: i for i, pid in enumerate(evaluated_ids)}
  stratum = entry["strata"][0]
  positives = {pid: float(row["pci"]) for pid, row in patients.items() if row["label_p"] == "1"}
  q1 = np.quantile(sorted(positives.values()), 1 / 3)
  members = [p for p, v in positives.items() if v <= q1]
  chosen = set(members) | {pid for pid, row in patients.items() if row["label_p"] == "0"}
  replicate_aucs = []
  for b in range(NUM_BOOTSTRAP):
    per_repeat = []
    for probabilities in by_repeat.values():
      ids = [pid for pid in probabilities if pid in chosen]  # the CSV's (fold) order
      labels = np.repeat([int(patients[pid]["label_p"]) for pid in ids], [int(weights[b, column[pid]]) for pid in ids])
      scores = np.repeat([probabilities[pid] for pid in ids], [int(weights[b, column[pid]]) for pid in ids])
      if 0 < labels.sum() < labels.size:
        per_repeat.append(roc_auc_score(labels, scores))
    if per_repeat:
      replicate_aucs.append(np.mean(per_repeat))
  low, high = np.percentile(replicate_aucs, [2.5, 97.5])
  assert stratum["metrics"]["auc"]["low"] == pytest.approx(low, abs=1e-9)
  assert stratum["metrics"]["auc"]["high"] == pytest.approx(high, abs=1e-9)


def test_report_shows_the_burden_table(evaluated):
  root, _ = evaluated
  with open(os.path.join(root, "eval", "report.md")) as handle:
    text = handle.read()
  assert "Disease burden: the positives cut by `pci`" in text


def test_no_burden_column_gives_none_and_ties_merge_strata():
  assert burden.burden_column(("ascites", "site")) is None
  assert burden.burden_column(("Site", "PCI")) == "PCI"
  assert burden.burden_column(("nodule_count",)) == "nodule_count"
  cuts, strata = burden.burden_strata({"a": 5.0, "b": 5.0, "c": 5.0})
  assert cuts == [] and [name for name, _, _ in strata] == ["all"]
  cuts, strata = burden.burden_strata({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "e": 5.0, "f": 6.0})
  assert [sorted(members) for _, _, members in strata] == [["a", "b"], ["c", "d"], ["e", "f"]]
