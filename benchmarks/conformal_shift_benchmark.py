"""Why cross-conformal coverage misses on some grids: each fold's model has its own probability scale (issue 22).

  python benchmarks/conformal_shift_benchmark.py --runs_dirs=runs/conformal/demo_sb-seed0,runs/conformal/demo_sb-seed1
      --tasks=p,sb --alphas=0.1,0.15,0.2

`pdx_tf.conformal.cross_conformal` calibrates a fold's test patients on the OTHER folds' out-of-fold
probabilities: scores of other models. Its guarantee assumes those scores are exchangeable with the fold's own.
When the fold models disagree on scale (a model that puts its negatives at a median 0.77 beside one that puts
them at 0.26), the fold whose negatives sit high loses coverage and the others gain; and because the bound sits in
the tail of each class, the average over folds falls below 1 - alpha (at an upper quantile the score's
distribution is concave, so a spread of shifts lowers the mean coverage).

For grids with inner patients (`--inner_fraction`: run.json's inner_validation holds their patient
probabilities, scored by the cell's own model, never trained on), this script compares, on the same out-of-fold
rows:
- `unscaled`: cross-conformal on the probabilities (the rule before ScoreScale; still what a grid without inner
  patients gets);
- `scaled`: the shipped rule, cross-conformal on each row's probability put on its model's own scale first
  (pdx_tf.conformal.ScoreScale: sigmoid((logit(p) - m_c) / s_c), m_c and s_c the mean and SD of logit(P) over
  the cell's inner patients; labels unused; a monotone map a cell, so a fold's ranking and AUC are unchanged);
- `inner_split`: each cell calibrated on its own inner patients only (split conformal: exchangeable with its test
  patients, but few of them: a class needs about 1/alpha patients for a finite bound).
Figures a (grid, task, alpha, scheme): per-class coverage, the uncertain share, the answered patients' accuracy
against all patients' accuracy at each cell's own threshold; and per fold, the median probability of its
negatives and positives and the fold's per-class coverage under `unscaled`. Appends one JSON line (code version,
machine, command, figures) to --output. Masks and training are not involved: finished grids only.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position

from pdx_tf import conformal, contracts  # pylint: disable=wrong-import-position
from pdx_tf.evaluation import grid_statistics, runs as runs_lib  # pylint: disable=wrong-import-position

_RUNS_DIRS = flags.DEFINE_list("runs_dirs", [], "Finished grids (one a seed), each with inner patients.")
_TASKS = flags.DEFINE_list("tasks", ["p"], "Tasks to read from each grid (p, sb).")
_ALPHAS = flags.DEFINE_list("alphas", ["0.1", "0.2"], "Conformal error rates.")
_OUTPUT = flags.DEFINE_string("output", "benchmarks/results/conformal_shift.jsonl", "JSON-lines output.")

SCHEMES = ("unscaled", "scaled", "inner_split")


def grid_rows(task_runs: runs_lib.TaskRuns, task: str) -> dict[str, np.ndarray | dict]:
  """The task's out-of-fold rows (repeat, fold, patient, label, probability, the cell's own threshold) and each
  cell's inner patients (probabilities, labels from the grid's patients.csv)."""
  own = grid_statistics.own_thresholds(task_runs)
  labels_by_patient = {patient: int(row[f"label_{task}"]) for patient, row in task_runs.patients.items()}
  columns: dict[str, list] = {name: [] for name in ("repeat", "fold", "patient", "label", "probability", "threshold")}
  inner = {}
  for (repeat, fold), cell in sorted(task_runs.cells.items()):
    for patient_id, label, probability in zip(cell.patient_ids, cell.patient_labels, cell.patient_probabilities):
      for name, value in zip(columns, (repeat, fold, patient_id, int(label), float(probability),
                                       own[(repeat, fold)] if own else 0.5)):
        columns[name].append(value)
    validation = contracts.task_run_document(cell.run_info, task).get("inner_validation")
    if validation:
      inner[(repeat, fold)] = (np.asarray(validation["patient_probabilities"], np.float64),
                               np.asarray([labels_by_patient[patient] for patient in validation["patients"]]))
  rows = {name: np.asarray(values, dtype=object if name == "patient" else None) for name, values in columns.items()}
  rows["inner"] = inner
  return rows


def scheme_sets(rows, scheme: str, alpha: float) -> tuple[np.ndarray, np.ndarray]:
  """(negative in the set, positive in the set) of every row under `scheme` (module docstring)."""
  repeats, folds, labels, probabilities = rows["repeat"], rows["fold"], rows["label"], rows["probability"]
  if scheme in ("unscaled", "scaled"):
    scales = ({cell: conformal.ScoreScale.fit(reference) for cell, (reference, _) in rows["inner"].items()}
              if scheme == "scaled" else None)
    result = conformal.cross_conformal(repeats, folds, rows["patient"], labels, probabilities, alpha, scales)
    return result.has_negative, result.has_positive
  has_negative, has_positive = np.zeros(labels.size, bool), np.zeros(labels.size, bool)
  for (repeat, fold), (reference, reference_labels) in rows["inner"].items():
    mine = (repeats == repeat) & (folds == fold)
    bounds = conformal.fit_thresholds(reference, reference_labels, alpha)
    has_negative[mine], has_positive[mine] = conformal.prediction_sets(probabilities[mine], bounds)
  return has_negative, has_positive


def figures(has_negative, has_positive, labels, probabilities, thresholds) -> dict[str, float]:
  labels = np.asarray(labels, np.int64)
  answers = conformal.answers(has_negative, has_positive)
  answered = answers != conformal.UNCERTAIN
  all_correct = (np.asarray(probabilities, np.float64) >= np.asarray(thresholds, np.float64)) == (labels == 1)
  answered_accuracy = (float(np.mean((answers[answered] == conformal.POSITIVE) == (labels[answered] == 1)))
                       if answered.any() else float("nan"))
  return {"coverage_negative": float(np.mean(has_negative[labels == 0])),
          "coverage_positive": float(np.mean(has_positive[labels == 1])),
          "uncertain_share": float(np.mean(~answered)), "answered_accuracy": answered_accuracy,
          "all_accuracy": float(np.mean(all_correct)), "accuracy_gain": answered_accuracy - float(np.mean(all_correct))}


def per_fold(rows, has_negative, has_positive) -> list[dict[str, float]]:
  out = []
  for fold in sorted(set(rows["fold"].tolist())):
    mine = rows["fold"] == fold
    negative, positive = mine & (rows["label"] == 0), mine & (rows["label"] == 1)
    out.append({"fold": int(fold), "median_probability_negatives": float(np.median(rows["probability"][negative])),
                "median_probability_positives": float(np.median(rows["probability"][positive])),
                "coverage_negative": float(np.mean(has_negative[negative])),
                "coverage_positive": float(np.mean(has_positive[positive]))})
  return out


def main(argv):
  del argv
  import results_io  # pylint: disable=import-outside-toplevel  (benchmarks/: one JSON line a run)
  alphas = [float(value) for value in _ALPHAS.value]
  results = []
  for runs_dir in _RUNS_DIRS.value:
    loaded = runs_lib.load_runs(runs_dir, tuple(_TASKS.value))
    for task in _TASKS.value:
      rows = grid_rows(loaded[task], task)
      if len(rows["inner"]) != len(loaded[task].cells):
        raise SystemExit(f"{runs_dir}: task {task} has cells without inner patients; train with --inner_fraction")
      for alpha in alphas:
        entry = {"runs_dir": runs_dir, "task": task, "alpha": alpha, "schemes": {}}
        for scheme in SCHEMES:
          has_negative, has_positive = scheme_sets(rows, scheme, alpha)
          entry["schemes"][scheme] = figures(has_negative, has_positive, rows["label"], rows["probability"],
                                             rows["threshold"])
          if scheme == "unscaled":
            entry["folds_unscaled"] = per_fold(rows, has_negative, has_positive)
        results.append(entry)
        print(f"{runs_dir} {task} alpha {alpha}: " + "; ".join(
            f"{name} cov {value['coverage_negative']:.2f}/{value['coverage_positive']:.2f} uncertain"
            f" {value['uncertain_share']:.2f} gain {value['accuracy_gain']:+.3f}"
            for name, value in entry["schemes"].items()), flush=True)
  results_io.record_figures("conformal_shift", results_io.json_safe({"benchmark": "conformal_shift",
                                                                      "runs": results}), path=_OUTPUT.value)


if __name__ == "__main__":
  app.run(main)
