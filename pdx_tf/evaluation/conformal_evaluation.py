"""Does the conformal guarantee hold, and what does abstention buy? One task's check on its out-of-fold rows.

Input: a task's runs (one row = one patient in one cell's test fold, its probability and label) and an error
rate alpha. The sets come from `pdx_tf.conformal.cross_conformal` (each cell calibrated on its repeat's other
folds). Output: the summary.json entry `conformal` of the task (keys below, stable), each row's answer for
E/patient_predictions.csv, the report's blocks and one figure.

summary[task]["conformal"]:
  alpha, scheme, n_rows, n_patients
  coverage, coverage_negative, coverage_positive: {estimate, low, high, n_bootstrap_defined}: the share of rows
    whose set holds the true label (overall, among negatives, among positives), 95 % patient-bootstrap CI
  uncertain_share, empty_share: the share answered "uncertain" (both labels, or the empty set) and, within it,
    the empty sets; n_uncertain, n_empty, n_answered
  answered: {"n", "accuracy", "sensitivity", "specificity"} of the singleton answers vs the truth;
    answered_accuracy (CI), all_accuracy (CI): the accuracy at the operating threshold over every row
  risk_coverage: {"conformal": {"coverage": [...], "selective_accuracy": [...]}, "ensemble_sd": same or None}
  ece (CI): expected calibration error, 10 equal-width bins: sum_b n_b/n |mean label_b - mean probability_b|
  sd_error_auc (CI) or None: AUC of a patient's SD over repeats for "its mean probability is wrong at the
    threshold" (0.5: the SD does not rank errors); sd_note says why None (one repeat: no SD)
  cell_thresholds: per cell {"cell", "negative_max_score", "positive_max_score", "num_negative", "num_positive"}
    (bounds on the scaled scores when "scaled")
  scaled: whether each cell's probabilities were put on its model's scale first (every cell has inner patients:
    `cell_scales`, pdx_tf/conformal.py's ScoreScale)

The bootstrap resamples patients (grid_statistics.bootstrap_weights, the same replicates as the other CIs of the
task): every row of a patient carries the patient's resampling count.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, Mapping, Sequence

import numpy as np

from pdx_tf import conformal, contracts
from pdx_tf.evaluation import grid_statistics
from pdx_tf.evaluation.runs import TaskRuns

SCHEME = ("cross-conformal across folds, class-conditional (Mondrian): each cell's test patients calibrated on the"
          " out-of-fold probabilities of its repeat's other folds (pdx_tf/conformal.py)")
SCALED_SCHEME = SCHEME + ("; each cell's probabilities first put on its model's own scale, fitted on the cell's"
                          " inner patients (conformal.ScoreScale)")


def cell_scales(task_runs: TaskRuns) -> dict[tuple[int, int], conformal.ScoreScale] | None:
  """(repeat, fold) -> the ScoreScale of that cell's model, from its inner patients' probabilities (run.json's
  inner_validation, the task's view), for every cell; None when any cell has fewer than 2 inner patients."""
  keys = list(task_runs.cells)
  scales = conformal.fit_scales([
      (contracts.task_run_document(task_runs.cells[key].run_info, task_runs.task).get("inner_validation") or {})
      .get("patient_probabilities") or [] for key in keys])
  return None if scales is None else dict(zip(keys, scales))
ECE_BINS = 10
RISK_COVERAGE_POINTS = 20  # coverage 1.0, 0.95, ..., 0.05
FIGURE_NAME = "conformal"
FIGURE_CAPTION = ("Conformal answers. Left: coverage (share of patients whose set holds the true label) overall and "
                  "per class with 95 % patient-bootstrap CIs; dashed: the target 1 - alpha. Right: risk-coverage, the "
                  "accuracy at the threshold on the patients kept as the least confident are set aside, ranked by the "
                  "conformal confidence (1 - the smaller p-value) and by the SD over repeats (low SD kept first).")
METHODS_NOTE = ("Conformal sets (docs/conformal.md): nonconformity 1 - p for positive, p for negative; per class y "
                "q_y = the ceil((n_y + 1)(1 - alpha))-th smallest calibration score (infinite if that exceeds n_y); "
                "the set is {y : score(y) <= q_y}. Each cell's test patients are calibrated on the out-of-fold "
                "probabilities of the same repeat's other folds (cross-conformal, Vovk 2015), never on a patient of "
                "their own test fold. Both labels or none: answered 'uncertain' (the empty sets counted apart).")


@dataclasses.dataclass(frozen=True)
class ConformalEvaluation:
  """One task's conformal check: `summary` (JSON-safe) and each row's answer by (repeat, fold, patient_id)."""
  task: str
  alpha: float
  summary: dict[str, Any]
  answers: Mapping[tuple[int, int, str], str]
  figure_data: Mapping[str, Any]


def _rows(task_runs: TaskRuns, threshold: float):
  own = grid_statistics.own_thresholds(task_runs)
  repeats, folds, patients, labels, probabilities, thresholds = [], [], [], [], [], []
  for (repeat, fold), cell in sorted(task_runs.cells.items()):
    for patient_id, label, probability in zip(cell.patient_ids, cell.patient_labels, cell.patient_probabilities):
      repeats.append(repeat)
      folds.append(fold)
      patients.append(patient_id)
      labels.append(int(label))
      probabilities.append(float(probability))
      thresholds.append(own[(repeat, fold)] if own else threshold)
  return (np.asarray(repeats), np.asarray(folds), np.asarray(patients, dtype=object), np.asarray(labels),
          np.asarray(probabilities), np.asarray(thresholds))


def _weighted_share(weights: np.ndarray, values: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Per replicate (weights [B, rows]): sum w * values over `mask` / sum w over `mask` (NaN where no weight)."""
  numerator = weights[:, mask] @ values[mask].astype(np.float64)
  denominator = weights[:, mask].sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(denominator > 0, numerator / np.maximum(denominator, 1e-300), np.nan)


def _interval(estimate: float, replicates: np.ndarray | None) -> dict[str, Any]:
  if replicates is None:
    return {"estimate": estimate, "low": None, "high": None, "n_bootstrap_defined": 0}
  return grid_statistics.percentile_interval(estimate, replicates)


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, weights: np.ndarray | None = None,
                               num_bins: int = ECE_BINS) -> np.ndarray | float:
  """ECE = sum over equal-width bins of |sum_(i in bin) w_i (label_i - p_i)| / sum w (= n_b/n |mean label - mean p|
  unweighted). `weights` [B, n] gives one value a replicate; None the plain estimate."""
  bins = np.minimum((np.asarray(probabilities) * num_bins).astype(int), num_bins - 1)
  residual = np.asarray(labels, np.float64) - np.asarray(probabilities, np.float64)
  plain = weights is None
  weights = np.ones((1, residual.size)) if plain else weights
  total = np.zeros(weights.shape[0])
  for index in range(num_bins):
    mask = bins == index
    if mask.any():
      total += np.abs(weights[:, mask] @ residual[mask])
  with np.errstate(invalid="ignore", divide="ignore"):
    values = total / weights.sum(axis=1)
  return float(values[0]) if plain else values


def weighted_auc(positive: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray | float:
  """AUC (ties count 1/2) of `scores` for the boolean `positive`; with weights [B, n] one value a replicate."""
  positive = np.asarray(positive, bool)
  scores = np.asarray(scores, np.float64)
  plain = weights is None
  weights = np.ones((1, scores.size)) if plain else weights
  if positive.all() or not positive.any():
    values = np.full(weights.shape[0], np.nan)
  else:
    wins = ((scores[positive][:, None] > scores[~positive][None, :])
            + 0.5 * (scores[positive][:, None] == scores[~positive][None, :]))
    weights_positive, weights_negative = weights[:, positive], weights[:, ~positive]
    numerator = np.einsum("bi,ij,bj->b", weights_positive, wins, weights_negative)
    denominator = weights_positive.sum(axis=1) * weights_negative.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
      values = np.where(denominator > 0, numerator / np.maximum(denominator, 1e-300), np.nan)
  return float(values[0]) if plain else values


def risk_coverage(correct: np.ndarray, confidence: np.ndarray, points: int = RISK_COVERAGE_POINTS) -> dict[str, list]:
  """Selective accuracy when only the most confident share is kept: at coverage c = 1, 1 - 1/points, ..., the
  accuracy of the ceil(c * n) rows of highest `confidence` (stable order on ties)."""
  order = np.argsort(-np.asarray(confidence, np.float64), kind="stable")
  correct = np.asarray(correct, np.float64)[order]
  coverages, accuracies = [], []
  for step in range(points):
    coverage = 1.0 - step / points
    kept = max(1, int(math.ceil(coverage * correct.size - 1e-9)))
    coverages.append(coverage)
    accuracies.append(float(np.mean(correct[:kept])))
  return {"coverage": coverages, "selective_accuracy": accuracies}


def _ensemble_sd(task_runs: TaskRuns, patients: np.ndarray, labels: np.ndarray, probabilities: np.ndarray,
                 thresholds: np.ndarray):
  """Per patient evaluated in >= 2 repeats: (patient ids, SD over repeats (ddof 1), wrong at the mean threshold)."""
  ids = sorted(set(patients.tolist()))
  chosen, sds, wrong = [], [], []
  for patient_id in ids:
    mask = patients == patient_id
    if mask.sum() < 2:
      continue
    chosen.append(patient_id)
    sds.append(float(np.std(probabilities[mask], ddof=1)))
    wrong.append(bool((np.mean(probabilities[mask]) >= np.mean(thresholds[mask])) != bool(labels[mask][0])))
  return chosen, np.asarray(sds), np.asarray(wrong, bool)


def evaluate_conformal(task_runs: TaskRuns, alpha: float, threshold: float, num_bootstrap: int,
                       seed: int) -> ConformalEvaluation:
  """The task's conformal summary entry (module docstring) at `alpha`; `threshold` as grid_statistics uses it."""
  alpha = conformal.check_alpha(alpha)
  repeats, folds, patients, labels, probabilities, thresholds = _rows(task_runs, threshold)
  scales = cell_scales(task_runs)
  result = conformal.cross_conformal(repeats, folds, patients, labels, probabilities, alpha, scales)
  answers = result.answers
  covered = np.where(labels == 1, result.has_positive, result.has_negative)
  uncertain = answers == conformal.UNCERTAIN
  empty = result.is_empty
  answered = ~uncertain
  answered_correct = (answers == np.where(labels == 1, conformal.POSITIVE, conformal.NEGATIVE))
  decisions = probabilities >= thresholds
  correct_at_threshold = decisions == labels.astype(bool)

  patient_ids = sorted(set(patients.tolist()))
  index = {patient_id: position for position, patient_id in enumerate(patient_ids)}
  row_patient = np.asarray([index[patient_id] for patient_id in patients], dtype=np.int64)
  weights = None
  if num_bootstrap:
    weights = grid_statistics.bootstrap_weights(len(patient_ids), num_bootstrap, seed, task_runs.task)[:, row_patient]

  everything = np.ones(labels.size, bool)

  def share(values, mask):
    estimate = float(np.mean(values[mask])) if mask.any() else math.nan
    return _interval(estimate, None if weights is None else _weighted_share(weights, values, mask))

  answered_positive, answered_negative = answered & (labels == 1), answered & (labels == 0)
  summary: dict[str, Any] = {
      "alpha": alpha, "scheme": SCHEME if scales is None else SCALED_SCHEME, "scaled": scales is not None,
      "n_rows": int(labels.size), "n_patients": len(patient_ids),
      "coverage": share(covered, everything),
      "coverage_negative": share(covered, labels == 0),
      "coverage_positive": share(covered, labels == 1),
      "uncertain_share": share(uncertain, everything),
      "empty_share": share(empty, everything),
      "n_uncertain": int(uncertain.sum()), "n_empty": int(empty.sum()), "n_answered": int(answered.sum()),
      "answered": {
          "n": int(answered.sum()),
          "accuracy": float(np.mean(answered_correct[answered])) if answered.any() else None,
          "sensitivity": (float(np.mean(answers[answered_positive] == conformal.POSITIVE))
                          if answered_positive.any() else None),
          "specificity": (float(np.mean(answers[answered_negative] == conformal.NEGATIVE))
                          if answered_negative.any() else None),
      },
      "answered_accuracy": share(answered_correct, answered),
      "all_accuracy": share(correct_at_threshold, everything),
      "ece": _interval(expected_calibration_error(labels, probabilities),
                       None if weights is None else expected_calibration_error(labels, probabilities, weights)),
      "cell_thresholds": [{"cell": f"r{cell[0]:02d}_f{cell[1]:02d}", **value.to_dict()}
                          for cell, value in sorted(result.thresholds.items())],
  }
  curves = {"conformal": risk_coverage(correct_at_threshold, result.confidence), "ensemble_sd": None}
  sd_patients, sds, wrong = _ensemble_sd(task_runs, patients, labels, probabilities, thresholds)
  if sd_patients:
    curves["ensemble_sd"] = risk_coverage(~wrong, -sds)
    sd_weights = None
    if weights is not None:
      full = grid_statistics.bootstrap_weights(len(patient_ids), num_bootstrap, seed, task_runs.task)
      sd_weights = full[:, [index[patient_id] for patient_id in sd_patients]]
    summary["sd_error_auc"] = _interval(weighted_auc(wrong, sds),
                                        None if sd_weights is None else weighted_auc(wrong, sds, sd_weights))
    summary["sd_note"] = (f"{len(sd_patients)} patients with predictions in >= 2 repeats; wrong = mean probability"
                          " over repeats on the wrong side of the mean threshold")
  else:
    summary["sd_error_auc"] = None
    summary["sd_note"] = "no patient was predicted in two or more repeats (one repeat): no SD over models"
  summary["risk_coverage"] = curves
  row_answers = {(int(r), int(f), str(p)): str(a) for r, f, p, a in zip(repeats, folds, patients, answers)}
  figure_data = {"summary": summary, "curves": curves}
  return ConformalEvaluation(task=task_runs.task, alpha=alpha, summary=grid_statistics.json_safe(summary),
                             answers=row_answers, figure_data=figure_data)


def runs_alpha(task_runs: TaskRuns) -> float | None:
  """The conformal_alpha the cells were trained with (run.json's config), None if none; raises ValueError if
  cells disagree."""
  values = {cell.run_info.get("config", {}).get("conformal_alpha") for cell in task_runs.cells.values()}
  values.discard(None)
  if len(values) > 1:
    raise ValueError(f"the cells of task {task_runs.task} were trained with different conformal_alpha"
                     f" {sorted(values)}; pass --conformal_alpha to choose one")
  return float(values.pop()) if values else None


# ------------------------------------------------------------------------------------------------ report


def _percent(entry: Mapping[str, Any] | None) -> str:
  if not entry or entry.get("estimate") is None:
    return "n/a"
  text = f"{100 * entry['estimate']:.1f}"
  if entry.get("low") is not None and entry.get("high") is not None:
    text += f" ({100 * entry['low']:.1f}-{100 * entry['high']:.1f})"
  return text


def report_blocks(task_summary: Mapping[str, Any]) -> list[tuple[str, Any]]:
  """The report's blocks for a task's "conformal" entry (none without one): a paragraph and a table."""
  entry = task_summary.get("conformal")
  if not entry:
    return []
  alpha = entry["alpha"]
  answered = entry["answered"]

  def number(value):
    return "n/a" if value is None else f"{100 * value:.1f}"

  rows = [["Coverage, all", _percent(entry["coverage"])],
          ["Coverage, negatives", _percent(entry["coverage_negative"])],
          ["Coverage, positives", _percent(entry["coverage_positive"])],
          ["Uncertain (refer)", _percent(entry["uncertain_share"])],
          ["  of which empty sets", _percent(entry["empty_share"])],
          ["Accuracy, answered", _percent(entry["answered_accuracy"])],
          ["Accuracy, all (threshold)", _percent(entry["all_accuracy"])],
          ["Sensitivity, answered", number(answered["sensitivity"])],
          ["Specificity, answered", number(answered["specificity"])],
          ["ECE", _percent(entry["ece"])],
          ["AUC of SD for errors", "n/a" if not entry.get("sd_error_auc") else
           f"{entry['sd_error_auc']['estimate']:.3f}" + (
               f" ({entry['sd_error_auc']['low']:.3f}-{entry['sd_error_auc']['high']:.3f})"
               if entry["sd_error_auc"].get("low") is not None else "")]]
  text = (f"Conformal answers at alpha {alpha:g} (target coverage {100 * (1 - alpha):.0f} % per class): "
          f"{entry['n_answered']} of {entry['n_rows']} out-of-fold predictions answered, {entry['n_uncertain']} "
          f"uncertain ({entry['n_empty']} empty sets). {entry['sd_note']}.")
  return [("p", text), ("table", ("Conformal answers (% with 95 % patient-bootstrap CI).", ["Quantity", "Value"],
                                  rows))]


def conformal_figure(evaluations: Sequence[ConformalEvaluation]) -> bytes:
  """Per task: coverage bars with CIs and the 1 - alpha line; risk-coverage curves (conformal, ensemble SD)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  figure, axes = plt.subplots(len(evaluations), 2, figsize=(10, 3.6 * len(evaluations)), squeeze=False)
  for row, evaluation in enumerate(evaluations):
    summary, curves = evaluation.figure_data["summary"], evaluation.figure_data["curves"]
    left, right = axes[row]
    names = ("coverage", "coverage_negative", "coverage_positive")
    estimates = [summary[name]["estimate"] for name in names]
    lows = [summary[name]["low"] if summary[name]["low"] is not None else summary[name]["estimate"] for name in names]
    highs = [summary[name]["high"] if summary[name]["high"] is not None else summary[name]["estimate"]
             for name in names]
    positions = np.arange(len(names))
    estimates_array = np.asarray(estimates, np.float64)
    errors = np.abs(np.vstack([estimates_array - np.asarray(lows, np.float64),
                               np.asarray(highs, np.float64) - estimates_array]))
    left.bar(positions, estimates_array, yerr=np.nan_to_num(errors), color=["#4c72b0", "#55a868", "#c44e52"],
             capsize=4)
    left.axhline(1 - evaluation.alpha, color="k", linestyle="--", linewidth=1)
    left.set_xticks(positions, ["all", "negatives", "positives"])
    left.set_ylim(0, 1.05)
    left.set_ylabel("coverage")
    left.set_title(f"{evaluation.task}: coverage at alpha {evaluation.alpha:g}; "
                   f"{100 * summary['uncertain_share']['estimate']:.0f} % uncertain")
    for name, curve in curves.items():
      if curve is not None:
        right.plot(curve["coverage"], curve["selective_accuracy"], marker="o", markersize=3,
                   label={"conformal": "conformal confidence", "ensemble_sd": "SD over repeats"}[name])
    right.set_xlim(1.02, 0)
    right.set_xlabel("share of patients answered")
    right.set_ylabel("accuracy of the answered")
    right.set_title(f"{evaluation.task}: risk-coverage")
    right.grid(alpha=0.3)
    right.legend(loc="lower left", fontsize=8.5)
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
  plt.close(figure)
  return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ external cohort

# predict's cohort CSV columns (pdx_tf.serving.cohort_predict): the answer, the set's members and the alpha.
EXTERNAL_COLUMNS = ("conformal_set", "conformal_members", "alpha")


def external_coverage(task: str, rows: Sequence[Any], alpha: float | None, num_bootstrap: int,
                      seed: int) -> dict[str, Any] | None:
  """Does the export's guarantee hold on an external cohort? Coverage of the labelled rows' sets.

  Args:
    task: the task.
    rows: external.PredictionRow's of that task; their `conformal` holds the EXTERNAL_COLUMNS given in the CSV.
    alpha: the alpha to check against; None: the rows' alpha column (all rows must agree).
    num_bootstrap, seed: the patient bootstrap.

  Returns:
    None when no labelled row has a set; else {"alpha", "n", coverage / coverage_negative / coverage_positive /
    uncertain_share / empty_share (each {estimate, low, high, ...}), "shortfall": bool, "message": one line}.
    A row with only conformal_set "uncertain" (no conformal_members) counts as the both-labels set.

  Raises:
    ValueError: the alpha column is missing, unparseable or mixed and no alpha is given.
  """
  labelled = sorted((row for row in rows if row.label is not None and row.conformal.get("conformal_set")),
                    key=lambda row: row.patient_id)
  if not labelled:
    return None
  if alpha is None:
    values = {row.conformal.get("alpha", "") for row in labelled}
    try:
      parsed = {float(value) for value in values}
    except ValueError:
      parsed = set()
    if len(parsed) != 1:
      raise ValueError(f"task {task}: the predictions' alpha column is missing or mixed ({sorted(values)}); pass"
                       " --conformal_alpha")
    alpha = parsed.pop()
  alpha = conformal.check_alpha(alpha)
  members = []
  for row in labelled:
    name = row.conformal.get("conformal_members") or {"uncertain": "both"}.get(row.conformal["conformal_set"],
                                                                                row.conformal["conformal_set"])
    if name not in conformal.SET_NAMES.values():
      raise ValueError(f"task {task}, patient {row.patient_id}: conformal set {name!r} is not one of"
                       f" {', '.join(conformal.SET_NAMES.values())}")
    members.append(name)
  members = np.asarray(members)
  labels = np.asarray([row.label for row in labelled])
  has_negative = np.isin(members, ("negative", "both"))
  has_positive = np.isin(members, ("positive", "both"))
  covered = np.where(labels == 1, has_positive, has_negative)
  weights = (grid_statistics.bootstrap_weights(len(labelled), num_bootstrap, seed, task) if num_bootstrap
             else None)

  def share(values, mask):
    estimate = float(np.mean(values[mask])) if mask.any() else math.nan
    return _interval(estimate, None if weights is None else _weighted_share(weights, values, mask))

  everything = np.ones(labels.size, bool)
  result = {"alpha": alpha, "n": int(labels.size),
            "coverage": share(covered, everything), "coverage_negative": share(covered, labels == 0),
            "coverage_positive": share(covered, labels == 1),
            "uncertain_share": share(~(has_negative ^ has_positive), everything),
            "empty_share": share(~has_negative & ~has_positive, everything)}
  short = []
  for name, words in (("coverage_negative", "negatives"), ("coverage_positive", "positives")):
    entry = result[name]
    bound = entry["high"] if entry.get("high") is not None else entry["estimate"]
    if entry["estimate"] is not None and math.isfinite(entry["estimate"]) and bound < 1 - alpha:
      short.append(f"{words} {entry['estimate']:.2f}" + (f" (95 % CI {entry['low']:.2f}-{entry['high']:.2f})"
                                                         if entry.get("high") is not None else ""))
  result["shortfall"] = bool(short)
  result["message"] = (f"task {task}: conformal coverage SHORTFALL at alpha {alpha:g}: {', '.join(short)} below the"
                       f" promised {1 - alpha:.2f}; this cohort differs from the training patients: do not rely on"
                       " the sets before recalibrating on local patients" if short else
                       f"task {task}: conformal coverage at alpha {alpha:g} holds ({result['coverage']['estimate']:.2f}"
                       f" overall, promised {1 - alpha:.2f} per class)")
  return grid_statistics.json_safe(result)
