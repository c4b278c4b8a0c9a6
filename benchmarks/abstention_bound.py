"""How much accuracy can abstaining on 30 % of patients buy at most? (issue 22's abstention target)

  python benchmarks/abstention_bound.py --evaluation_dirs=runs/conformal/evaluation/demo_sb-seed0-alpha0.1,...
  python benchmarks/abstention_bound.py            # the binormal table only

Issue 22 asks, on the demo, for the answered patients' accuracy to be at least 10 points above all patients' at no
more than 30 % "uncertain". A conformal answer (pdx_tf/conformal.py) abstains on a band of each cell's score:
below the band the set is {negative}, above it {positive}, inside it {both} or {} (uncertain). This script puts
three figures beside the conformal answers, all at the same abstention budget (--max_abstain).

1. `binormal`: the best any abstainer can do on smooth scores. Binormal scores (negatives N(0, 1), positives
   N(d, s^2), d = Phi^-1(AUC) sqrt(1 + s^2)), for AUC 0.70-0.99, prevalence 0.25 / 0.5 and the positives' SD s
   0.5-2 (1: equal variance). "All" is the accuracy at the best single threshold; "answered" the best accuracy
   over every band [a, b] holding at most --max_abstain of the patients (answers: negative below a, positive
   above b). A fine grid of the normal CDF, no sampling.
2. `oracle` (per --evaluation_dirs, per task; with the pooled AUC, the prevalence and the positives' logit SD over
   the negatives', the shape to read table 1 at): hindsight. On an evaluation's out-of-fold rows
   (E/patient_predictions.csv: task, repeat, fold, label, probability, predicted), the best band per cell chosen
   KNOWING the labels (the cell's rows sorted by probability; band width w in 0..n rows; rows below answered
   negative, above positive), and the best split of the budget (floor(--max_abstain * rows)) over the cells (a
   knapsack on each cell's best-correct-by-width). Every conformal band is among its candidates, so it bounds any
   per-cell band rule from above; with about 30 rows a cell it also fits the labels' noise, so it is loose.
3. `nearest`: a rule that needs no labels. Refer the rows nearest their cell's threshold (in logits, over the
   cell's logit SD) up to the budget; answer the rest at the threshold (the evaluation's `predicted`).

"All" in 2 and 3 is the evaluation's own: the rows' `predicted`. Beside them, the evaluation's conformal answer
(its summary.json: answered accuracy, uncertain share). Output: a table, and one JSON line (code version,
machine, command, figures) appended to --output (default benchmarks/results/abstention_bound.jsonl). No
training; the run reads finished evaluations only.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys

import numpy as np
from absl import app, flags

from pdx_tf import conformal, metrics

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_EVALUATION_DIRS = flags.DEFINE_list("evaluation_dirs", [], "evaluate's output folders (patient_predictions.csv and "
                                     "summary.json); empty: the binormal table only")
_MAX_ABSTAIN = flags.DEFINE_float("max_abstain", 0.3, "the most patients a rule may call uncertain (share)")
_OUTPUT = flags.DEFINE_string("output", None, "JSON lines file (default benchmarks/results/abstention_bound.jsonl)")

BINORMAL_AUCS = (0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99)
BINORMAL_PREVALENCES = (0.25, 0.5)
BINORMAL_POSITIVE_SDS = (0.5, 0.7, 1.0, 1.5, 2.0)  # unequal variance: real scores' positives are often narrower


def _normal_cdf(x: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.vectorize(math.erf)(np.asarray(x, np.float64) / math.sqrt(2.0)))


def _normal_ppf(p: float) -> float:
  low, high = -10.0, 10.0  # bisection: no scipy needed for one quantile
  for _ in range(100):
    middle = 0.5 * (low + high)
    if 0.5 * (1.0 + math.erf(middle / math.sqrt(2.0))) < p:
      low = middle
    else:
      high = middle
  return 0.5 * (low + high)


def binormal_bound(auc: float, prevalence: float, max_abstain: float, grid_step: float = 0.01,
                   positive_sd: float = 1.0) -> dict:
  """The best accuracy gain of abstaining on a score band, for binormal scores.

  Args:
    auc: the scores' AUC (0.5 < auc < 1).
    prevalence: the positives' share.
    max_abstain: the most probability mass the band may hold.
    grid_step: the score grid's step (band edges and threshold lie on it).
    positive_sd: the positives' SD; the negatives' is 1 (1: equal variance). The positives' mean is then
      Phi^-1(AUC) sqrt(1 + positive_sd^2).
  Returns:
    {auc, prevalence, positive_sd, all_accuracy (best single threshold), answered_accuracy (best band with mass
    <= max_abstain, answers negative below and positive above), abstained (the band's mass), gain}.
  """
  shift = _normal_ppf(auc) * math.sqrt(1.0 + positive_sd ** 2)
  edges = np.arange(-8.0, shift + 8.0 * positive_sd + grid_step, grid_step)
  negative_below = (1.0 - prevalence) * _normal_cdf(edges)           # negatives with score < edge
  positive_below = prevalence * _normal_cdf((edges - shift) / positive_sd)  # positives with score < edge
  all_accuracy = float(np.max(negative_below + prevalence - positive_below))
  mass_below = negative_below + positive_below
  best = (all_accuracy, 0.0)
  for start in range(len(edges)):
    # Band [edges[start], edges[end]): every end whose band holds at most max_abstain is tried.
    ends = np.arange(start, len(edges))
    mass = mass_below[ends] - mass_below[start]
    ends = ends[mass <= max_abstain + 1e-12]
    mass = mass[: len(ends)]
    correct = negative_below[start] + (prevalence - positive_below[ends])
    answered = 1.0 - mass
    accuracy = correct / np.maximum(answered, 1e-12)
    index = int(np.argmax(accuracy))
    if accuracy[index] > best[0]:
      best = (float(accuracy[index]), float(mass[index]))
  return {"auc": auc, "prevalence": prevalence, "positive_sd": positive_sd, "all_accuracy": all_accuracy,
          "answered_accuracy": best[0],
          "abstained": best[1], "gain": best[0] - all_accuracy}


def cell_best_correct(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
  """best[w]: the most correct answers in one cell when w of its rows (one contiguous band) abstain.

  Args:
    labels: the cell's rows' 0/1 labels.
    probabilities: their scores.
  Returns:
    [n + 1] ints: for each band width w, the max over band starts i of (negatives among the i lowest rows) +
    (positives among the rows above the band), the rows sorted by probability (ties in input order).
  """
  order = np.argsort(probabilities, kind="stable")
  ordered = np.asarray(labels)[order]
  n = len(ordered)
  negatives_below = np.concatenate([[0], np.cumsum(ordered == 0)])   # negatives among the first i rows
  positives_above = np.concatenate([np.cumsum((ordered == 1)[::-1])[::-1], [0]])  # positives in rows >= i
  best = np.zeros(n + 1, np.int64)
  for width in range(n + 1):
    starts = np.arange(0, n - width + 1)
    best[width] = int(np.max(negatives_below[starts] + positives_above[starts + width]))
  return best


def oracle_bound(cells: list[tuple[np.ndarray, np.ndarray]], max_abstain: float) -> dict:
  """The best answered accuracy of per-cell bands abstaining on at most max_abstain of all rows.

  Args:
    cells: one (labels, probabilities) pair a cell.
    max_abstain: the share of all rows the bands may hold together.
  Returns:
    {answered_accuracy, abstained (share), rows}: the best over every split of the abstention budget across the
    cells (a knapsack: best[k] = the most correct answers with k rows abstained so far).
  """
  total = sum(len(labels) for labels, _ in cells)
  budget = int(math.floor(max_abstain * total))
  best = np.full(budget + 1, -1, np.int64)
  best[0] = 0
  for labels, probabilities in cells:
    cell = cell_best_correct(labels, probabilities)
    merged = np.full(budget + 1, -1, np.int64)
    for used in np.flatnonzero(best >= 0):
      for width in range(0, min(len(cell) - 1, budget - used) + 1):
        merged[used + width] = max(merged[used + width], best[used] + cell[width])
    best = merged
  answered = total - np.arange(budget + 1)
  accuracy = np.where(best >= 0, best / np.maximum(answered, 1), -1.0)
  index = int(np.argmax(accuracy))
  return {"answered_accuracy": float(accuracy[index]), "abstained": index / total, "rows": total}


def nearest_threshold(cells: list[tuple[np.ndarray, np.ndarray]], predicted: list[np.ndarray],
                      max_abstain: float) -> dict:
  """A rule that needs no labels: refer the rows nearest their cell's threshold, answer the rest by the threshold.

  Args:
    cells: one (labels, probabilities) pair a cell.
    predicted: each cell's rows' 0/1 answers at its threshold (the evaluation's `predicted`).
    max_abstain: the share of all rows referred (floor of it, in rows).
  Returns:
    {answered_accuracy, abstained, rows}. A cell's threshold is read off its answers: the logit midway between
    its highest row answered 0 and its lowest answered 1; a row's distance is |logit(p) - that| over the SD of
    the cell's logits (so that cells of different spread compare).
  """
  distances, correct = [], []
  for (labels, probabilities), answers in zip(cells, predicted):
    logits = conformal.logit(probabilities)
    below = logits[answers == 0].max() if np.any(answers == 0) else logits.min()
    above = logits[answers == 1].min() if np.any(answers == 1) else logits.max()
    spread = float(np.std(logits)) or 1.0
    distances.append(np.abs(logits - (below + above) / 2) / spread)
    correct.append(answers == labels)
  distance, right = np.concatenate(distances), np.concatenate(correct)
  referred = int(math.floor(max_abstain * len(distance)))
  kept = np.argsort(distance, kind="stable")[referred:]
  return {"answered_accuracy": float(np.mean(right[kept])), "abstained": referred / len(distance),
          "rows": len(distance)}


def read_evaluation(evaluation_dir: str) -> dict[str, dict]:
  """Per task: the out-of-fold rows grouped by cell, the cells' own accuracy and the conformal answer figures."""
  with open(os.path.join(evaluation_dir, "patient_predictions.csv"), newline="") as handle:
    rows = list(csv.DictReader(handle))
  with open(os.path.join(evaluation_dir, "summary.json")) as handle:
    summary = json.load(handle)
  tasks = {}
  for task in sorted({row["task"] for row in rows}):
    task_rows = [row for row in rows if row["task"] == task and row["label"] != ""]
    cells: dict[tuple[str, str], list] = {}
    for row in task_rows:
      cells.setdefault((row["repeat"], row["fold"]), []).append(
          (int(row["label"]), float(row["probability"]), int(row["predicted"])))
    correct = np.mean([int(row["predicted"]) == int(row["label"]) for row in task_rows])
    conformal = (summary.get(task) or {}).get("conformal") or {}
    tasks[task] = {
        "cells": [(np.array([label for label, _, _ in values]), np.array([p for _, p, _ in values]))
                  for _, values in sorted(cells.items())],
        "predicted": [np.array([answer for _, _, answer in values]) for _, values in sorted(cells.items())],
        "all_accuracy": float(correct),
        "conformal_answered_accuracy": (conformal.get("answered") or {}).get("accuracy"),
        "conformal_uncertain_share": (conformal.get("uncertain_share") or {}).get("estimate"),
        "alpha": conformal.get("alpha"),
    }
  return tasks


def main(argv):
  del argv
  import results_io  # pylint: disable=import-outside-toplevel  (benchmarks/: one JSON line a run)
  max_abstain = _MAX_ABSTAIN.value
  binormal = [binormal_bound(auc, prevalence, max_abstain, positive_sd=sd)
              for sd in BINORMAL_POSITIVE_SDS for prevalence in BINORMAL_PREVALENCES for auc in BINORMAL_AUCS]
  print(f"binormal scores, best band holding <= {max_abstain:.0%} of patients:")
  for entry in binormal:
    print(f"  AUC {entry['auc']:.2f} prevalence {entry['prevalence']:.2f} positives' SD {entry['positive_sd']:.1f}: "
          f"all {entry['all_accuracy']:.3f}, "
          f"answered {entry['answered_accuracy']:.3f} at {entry['abstained']:.0%} abstained, "
          f"gain {entry['gain']:+.3f}")
  oracle = []
  for evaluation_dir in _EVALUATION_DIRS.value:
    for task, data in read_evaluation(evaluation_dir).items():
      bound = oracle_bound(data["cells"], max_abstain)
      nearest = nearest_threshold(data["cells"], data["predicted"], max_abstain)
      labels = np.concatenate([labels for labels, _ in data["cells"]])
      scores = np.concatenate([scores for _, scores in data["cells"]])
      logits = conformal.logit(scores)
      entry = {"evaluation_dir": evaluation_dir, "task": task, "pooled_auc": metrics.auc(labels, scores),
               "prevalence": float(np.mean(labels)),
               # The shape the binormal table is read at: positives' logit SD over negatives' (pooled cells).
               "positive_sd_ratio": float(np.std(logits[labels == 1]) / np.std(logits[labels == 0])),
               "all_accuracy": data["all_accuracy"], "oracle_answered_accuracy": bound["answered_accuracy"],
               "oracle_abstained": bound["abstained"],
               "oracle_gain": bound["answered_accuracy"] - data["all_accuracy"], "rows": bound["rows"],
               "nearest_answered_accuracy": nearest["answered_accuracy"], "nearest_abstained": nearest["abstained"],
               "nearest_gain": nearest["answered_accuracy"] - data["all_accuracy"],
               "conformal_alpha": data["alpha"], "conformal_answered_accuracy": data["conformal_answered_accuracy"],
               "conformal_uncertain_share": data["conformal_uncertain_share"]}
      oracle.append(entry)
      conformal_text = ("" if entry["conformal_answered_accuracy"] is None else
                        f"; conformal at alpha {entry['conformal_alpha']}: "
                        f"{entry['conformal_answered_accuracy'] - entry['all_accuracy']:+.3f} at "
                        f"{entry['conformal_uncertain_share']:.0%} uncertain")
      print(f"{os.path.basename(evaluation_dir.rstrip('/'))} {task}: AUC {entry['pooled_auc']:.3f}, positives' "
            f"logit SD / negatives' {entry['positive_sd_ratio']:.2f}, all "
            f"{entry['all_accuracy']:.3f}, oracle bands {entry['oracle_answered_accuracy']:.3f} at "
            f"{entry['oracle_abstained']:.0%} (gain {entry['oracle_gain']:+.3f}); nearest the threshold "
            f"{entry['nearest_gain']:+.3f} at {entry['nearest_abstained']:.0%}{conformal_text}", flush=True)
  results_io.record_figures("abstention_bound", results_io.json_safe(
      {"benchmark": "abstention_bound", "max_abstain": max_abstain, "binormal": binormal, "oracle": oracle}),
      path=_OUTPUT.value)


if __name__ == "__main__":
  app.run(main)
