"""External validation: a cohort's patient_predictions.csv (from `python -m predict --manifest=...`) -> report.

Input contract (one row a task and patient):
  task, patient_id, label (0, 1 or empty = unknown), probability (the ensemble mean, in [0, 1]),
  uncertainty (SD over the models; may be empty), predicted (0/1 at the export's threshold),
  optional drift_flags (';'-joined reasons the inputs look unlike the training data; empty if none),
  and the manifest's covariates as further columns.
Rows without a label are counted and reported as predictions only; every metric uses the labelled rows. The
metric keys of summary.json equal the cross-validation summary's (metrics.METRIC_NAMES); the CIs come from the
same patient bootstrap (grid_statistics.bootstrap_weights) and the subgroups from the same binning rules
(grid_statistics.covariate_groups). Every input problem raises RunsError with one line naming the file and the
row or column.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow as tf

from pdx_tf.contracts import TASKS
from pdx_tf.errors import RunsError
from pdx_tf.evaluation import clinical, grid_statistics, metrics as metrics_lib, runs as runs_lib

REQUIRED_COLUMNS = ("task", "patient_id", "label", "probability", "uncertainty", "predicted")
DRIFT_COLUMN = "drift_flags"
DRIFT_SEPARATOR = ";"
FLAGGED_PATIENTS_FILE = "flagged_patients.csv"
FLAGGED_PATIENTS_HEADER = ("task", "patient_id", "label", "probability", "predicted", "drift_flags")
CALIBRATION_BINS = 10
# predict's conformal columns (answer, members, alpha): checked by conformal_evaluation.external_coverage, not
# covariates.
CONFORMAL_COLUMNS = ("conformal_set", "conformal_members", "alpha")


@dataclasses.dataclass(frozen=True)
class ExternalConfig:
  """What to evaluate and how.

  Attributes:
    predictions_path: the cohort's patient_predictions.csv.
    output_dir: where summary.json, model_card.md, the reports and figures go.
    runs_dir: optional training output; its cross-validation figures stand beside the external ones.
    tasks: tasks to evaluate; empty means every task in the CSV.
    threshold: a probability >= threshold is a positive decision.
    num_bootstrap: patient-bootstrap replicates for the 95 % CIs (0 skips them).
    seed: key of the bootstrap resampling.
    allow_partial: with runs_dir, evaluate an unfinished grid's complete cells.
    conformal_alpha: the alpha of the coverage check of the CSV's conformal sets (None: its alpha column).
  """
  predictions_path: str
  output_dir: str
  runs_dir: str = ""
  tasks: tuple[str, ...] = ()
  threshold: float = 0.5
  num_bootstrap: int = 1000
  seed: int = 0
  allow_partial: bool = False
  conformal_alpha: float | None = None

  def __post_init__(self):
    if self.conformal_alpha is not None:
      from pdx_tf import conformal  # pylint: disable=import-outside-toplevel
      object.__setattr__(self, "conformal_alpha", conformal.check_alpha(self.conformal_alpha))
    if not isinstance(self.predictions_path, str) or not self.predictions_path:
      raise ValueError("predictions_path must be a non-empty path to patient_predictions.csv")
    if not isinstance(self.output_dir, str) or not self.output_dir:
      raise ValueError("output_dir must be a non-empty path for the evaluation outputs")
    tasks = (self.tasks,) if isinstance(self.tasks, str) else tuple(self.tasks)
    object.__setattr__(self, "tasks", tasks)
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
      raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))}; choose from {', '.join(TASKS)}")
    if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not (
        math.isfinite(self.threshold) and 0.0 < self.threshold < 1.0):
      raise ValueError(f"threshold must be a probability strictly between 0 and 1, got {self.threshold!r}")
    object.__setattr__(self, "threshold", float(self.threshold))
    if isinstance(self.num_bootstrap, bool) or not isinstance(self.num_bootstrap, int) or self.num_bootstrap < 0:
      raise ValueError(f"num_bootstrap must be an integer >= 0 (0 skips the CIs), got {self.num_bootstrap!r}")
    if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
      raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")



@dataclasses.dataclass(frozen=True)
class PredictionRow:
  """One row of the predictions CSV, parsed."""
  line: int
  task: str
  patient_id: str
  label: int | None  # None: unknown
  probability: float
  uncertainty: float  # NaN when empty
  predicted: int
  drift_flags: tuple[str, ...]
  covariates: Mapping[str, str]
  conformal: Mapping[str, str] = dataclasses.field(default_factory=dict)  # CONFORMAL_COLUMNS given in the CSV


def _fail(message: str) -> RunsError:
  return RunsError(" ".join(message.split()))


def read_predictions(path: str) -> tuple[list[PredictionRow], tuple[str, ...]]:
  """Reads and validates a predictions CSV.

  Returns:
    (rows in file order, covariate column names in file order).

  Raises:
    RunsError: one line naming the file and the missing column, or the line, task and patient of a bad row.
  """
  if not tf.io.gfile.exists(path):
    raise _fail(f"{path} does not exist; pass --predictions=<predict's output>/patient_predictions.csv")
  with tf.io.gfile.GFile(path, "r") as handle:
    reader = csv.reader(io.StringIO(handle.read()))
    header = next(reader, None)
    records = list(reader)
  if not header:
    raise _fail(f"{path} is empty; expected the header {','.join(REQUIRED_COLUMNS)} and one row a task and patient")
  header = [column.strip() for column in header]
  for column in REQUIRED_COLUMNS:
    if column not in header:
      raise _fail(f"{path} lacks the column {column}; a predictions CSV needs {','.join(REQUIRED_COLUMNS)} "
                  "(written by `python -m predict --manifest=...`)")
  covariates = tuple(column for column in header
                     if column not in REQUIRED_COLUMNS + (DRIFT_COLUMN,) + CONFORMAL_COLUMNS)
  rows, seen = [], {}
  for line, record in enumerate(records, start=2):
    if not any(cell.strip() for cell in record):
      continue  # a blank line
    if len(record) != len(header):
      raise _fail(f"{path} line {line} has {len(record)} fields but the header has {len(header)}; fix that row")
    values = dict(zip(header, (cell.strip() for cell in record)))
    task, patient_id = values["task"], values["patient_id"]
    where = f"{path} line {line} (task {task}, patient {patient_id})"
    if task not in TASKS:
      raise _fail(f"{where}: task {task!r} is not one of {', '.join(TASKS)}")
    if not patient_id:
      raise _fail(f"{path} line {line}: empty patient_id; every row needs the manifest's patient_id")
    if (task, patient_id) in seen:
      raise _fail(f"{where} repeats line {seen[(task, patient_id)]}; keep one row a task and patient")
    seen[(task, patient_id)] = line
    probability = _number(values["probability"])
    if probability is None or not 0.0 <= probability <= 1.0:
      raise _fail(f"{where}: probability {values['probability']!r} is not a number in [0, 1]; "
                  "re-run predict for that patient")
    label_text = values["label"]
    if label_text == "":
      label = None
    elif _number(label_text) in (0.0, 1.0):
      label = int(_number(label_text))
    else:
      raise _fail(f"{where}: label {label_text!r} is not 0, 1 or empty (unknown)")
    predicted = _number(values["predicted"])
    if predicted not in (0.0, 1.0):
      raise _fail(f"{where}: predicted {values['predicted']!r} is not 0 or 1")
    uncertainty = _number(values["uncertainty"]) if values["uncertainty"] else math.nan
    if uncertainty is None:
      raise _fail(f"{where}: uncertainty {values['uncertainty']!r} is not a number (or empty)")
    flags = tuple(flag.strip() for flag in values.get(DRIFT_COLUMN, "").split(DRIFT_SEPARATOR) if flag.strip())
    rows.append(PredictionRow(line=line, task=task, patient_id=patient_id, label=label, probability=probability,
                              uncertainty=uncertainty, predicted=int(predicted), drift_flags=flags,
                              covariates={column: values[column] for column in covariates},
                              conformal={column: values[column] for column in CONFORMAL_COLUMNS if column in values}))
  if not rows:
    raise _fail(f"{path} has a header but no rows; predict wrote no patient (see its failures.csv)")
  return rows, covariates


def _number(text: str) -> float | None:
  try:
    value = float(text)
  except ValueError:
    return None
  return value if math.isfinite(value) else None


def _subgroups(rows: Sequence[PredictionRow], covariates: Sequence[str], threshold: float) -> dict[str, Any]:
  """Per covariate and group (grid_statistics.covariate_groups rules): counts and the metrics of its patients."""
  result = {}
  for column in covariates:
    rule, groups, order = grid_statistics.covariate_groups(column, {row.patient_id: row.covariates[column]
                                                                    for row in rows})
    entries = []
    for label in order:
      members = [row for row in rows if groups[row.patient_id] == label]
      positives = sum(row.label for row in members)
      entries.append({
          "group": label, "n_patients": len(members), "n_positive": positives,
          "n_negative": len(members) - positives,
          "metrics": metrics_lib.binary_metrics([row.label for row in members],
                                                [row.probability for row in members], threshold),
      })
    result[column] = {"rule": rule, "groups": entries}
  return result


def _external_subgroup_value(group: Mapping[str, Any], metric: str):
  return group["metrics"][metric]


def _metrics_of(rows: Sequence[PredictionRow], threshold: float) -> dict[str, float]:
  return metrics_lib.binary_metrics([row.label for row in rows], [row.probability for row in rows], threshold)


def evaluate_task(task: str, rows: Sequence[PredictionRow], covariates: Sequence[str], threshold: float,
                  num_bootstrap: int, seed: int) -> dict[str, Any]:
  """One task's external summary entry (JSON-safe: None where a value is undefined).

  Args:
    task: "p" or "sb".
    rows: that task's rows (labelled and unlabelled).
    covariates: covariate column names.
    threshold, num_bootstrap, seed: the decision threshold and the bootstrap settings.
  """
  labelled = sorted((row for row in rows if row.label is not None), key=lambda row: row.patient_id)
  unlabelled = [row for row in rows if row.label is None]
  labels = np.asarray([row.label for row in labelled], dtype=np.int64)
  probabilities = np.asarray([row.probability for row in labelled], dtype=np.float64)
  weights = grid_statistics.bootstrap_weights(len(labelled), num_bootstrap, seed, task)
  point = metrics_lib.binary_metrics(labels, probabilities, threshold)
  replicates = (metrics_lib.weighted_metrics(labels, probabilities, weights, threshold) if num_bootstrap
                else {name: np.empty(0) for name in metrics_lib.METRIC_NAMES})
  counts = metrics_lib.confusion_counts(labels, probabilities, threshold)
  positives = int(labels.sum())
  flagged = [row for row in labelled if row.drift_flags]
  not_flagged = [row for row in labelled if not row.drift_flags]
  flagged_all = sorted((row for row in rows if row.drift_flags), key=lambda row: row.patient_id)
  label_by_patient = {row.patient_id: row.label for row in labelled}
  subgroups = _subgroups(labelled, covariates, threshold)
  summary = {
      "task": task,
      "mode": "external",
      "threshold": threshold,
      "decision_rule": "probability >= threshold is a positive prediction",
      "num_bootstrap": num_bootstrap,
      "seed": seed,
      "n_rows": len(rows),
      "n_patients": len(labelled),
      "n_positive": positives,
      "n_negative": len(labelled) - positives,
      "n_unlabelled": len(unlabelled),
      "confusion": dataclasses.asdict(counts),
      "metrics": point,
      "ci95": {name: grid_statistics.percentile_interval(point[name], replicates[name])
               for name in metrics_lib.METRIC_NAMES},
      "predicted_column_disagreements": sum(row.predicted != int(row.probability >= threshold) for row in rows),
      "uncertainty": grid_statistics.summarize_values([row.uncertainty for row in rows]),
      "calibration": clinical.calibration_fit(labels, probabilities),
      "calibration_bins": metrics_lib.calibration_bins(labels, probabilities, CALIBRATION_BINS) if labelled else [],
      "decision_curve": clinical.decision_curve([labels], [probabilities]),
      "subgroups": subgroups,
      "failure_analysis": clinical.failure_analysis(subgroups, _external_subgroup_value),
      "covariate_baselines": {
          "model_auc": grid_statistics.percentile_interval(point["auc"], replicates["auc"]),
          "covariates": clinical.covariate_baselines(
              covariates, {row.patient_id: row.covariates for row in labelled}, label_by_patient, weights),
      },
      "predictions_only": {
          "n_patients": len(unlabelled),
          "n_predicted_positive": sum(row.probability >= threshold for row in unlabelled),
          "n_flagged": sum(bool(row.drift_flags) for row in unlabelled),
      },
      "drift": {
          "n_flagged": len(flagged_all),
          "n_flagged_labelled": len(flagged),
          "metrics_flagged": _metrics_of(flagged, threshold),
          "metrics_not_flagged": _metrics_of(not_flagged, threshold),
          "n_not_flagged_labelled": len(not_flagged),
          "patients": [{"patient_id": row.patient_id, "label": row.label, "probability": row.probability,
                        "predicted": int(row.probability >= threshold), "reasons": list(row.drift_flags)}
                       for row in flagged_all],
      },
  }
  return grid_statistics.json_safe(summary)


def internal_summaries(config: ExternalConfig, tasks: Sequence[str]) -> dict[str, Any]:
  """The cross-validation summary entries (as evaluate_runs computes them) of `tasks`, or {} without runs_dir."""
  if not config.runs_dir:
    return {}
  loaded = runs_lib.load_runs(config.runs_dir, tasks, config.allow_partial)
  result = {}
  for task, task_runs in loaded.items():
    evaluation = grid_statistics.evaluate_task(task_runs, config.threshold, config.num_bootstrap, config.seed)
    result[task] = clinical.extend_grid_evaluation(evaluation, config.num_bootstrap, config.seed)
  return result
