"""The evaluation stage's entry point: EvaluateConfig and evaluate_runs (reads runs, writes the report).

Outputs in config.output_dir (schema in the README, section "Evaluation outputs"):
  config.json, summary.json, patient_predictions.csv, cell_metrics.csv, report.md, report.html, model_card.md,
  figures/*.png; TensorBoard summaries in <runs_dir>/tensorboard/evaluate.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np
import tensorflow as tf

from pdx_tf import configs, conformal, io_utils
from pdx_tf.contracts import CONFIG_FILE, PCI_TASK, SPLITS_FILE, SUMMARY_FILE
from pdx_tf.errors import RunsError
from pdx_tf.evaluation import clinical, external, grid_statistics, metrics as metrics_lib, model_card, report
from pdx_tf.evaluation import conformal_evaluation, pci, runs as runs_lib
from pdx_tf.evaluation import tensorboard

PATIENT_PREDICTIONS_FILE = "patient_predictions.csv"
CELL_METRICS_FILE = "cell_metrics.csv"
REPORT_MARKDOWN_FILE = "report.md"
REPORT_HTML_FILE = "report.html"
FIGURES_FOLDER = "figures"
TENSORBOARD_SUBDIR = ("tensorboard", "evaluate")
PATIENT_PREDICTIONS_HEADER = ("task", "repeat", "fold", "patient_id", "label", "probability", "predicted")
# With conformal sets (--conformal_alpha, or the runs' own): each row's answer (negative, positive or uncertain)
# and the alpha it was made at.
CONFORMAL_COLUMNS = ("conformal_set", "alpha")
CELL_METRICS_HEADER = ("task", "repeat", "fold", "level", "n", "n_positive", "true_positive", "false_positive",
                       "true_negative", "false_negative") + metrics_lib.METRIC_NAMES

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
  """What to evaluate and how.

  Attributes:
    runs_dir: a task's training output (e.g. runs/p) or a parent holding several (runs/).
    output_dir: where summary.json, the CSVs and the reports go.
    tasks: tasks to evaluate ("p", "sb", "regions": pdx_tf/evaluation/pci.py); empty means every task found below
      runs_dir.
    threshold: a probability >= threshold is a positive decision (cells that carry their own threshold in
      run.json, "threshold_rule" other than "fixed", e.g. inner_youden, use theirs instead).
    allow_partial: evaluate the complete cells that exist (the report is marked partial) instead of failing.
    num_bootstrap: patient-bootstrap replicates for the 95 % CIs (0 skips the CIs).
    seed: key of the bootstrap resampling.
    conformal_alpha: error rate of the conformal sets (pdx_tf.conformal; summary "conformal", the report's
      conformal section, patient_predictions.csv's conformal_set and alpha); None: the alpha the runs were trained
      with (run.json's config "conformal_alpha"), and no sets if they have none.
  """
  runs_dir: str
  output_dir: str
  tasks: tuple[str, ...] = ()
  threshold: float = 0.5
  allow_partial: bool = False
  num_bootstrap: int = 1000
  seed: int = 0
  conformal_alpha: float | None = None

  def __post_init__(self):
    if self.conformal_alpha is not None:
      object.__setattr__(self, "conformal_alpha", conformal.check_alpha(self.conformal_alpha))
    if not isinstance(self.runs_dir, str) or not self.runs_dir:
      raise ValueError("runs_dir must be a non-empty path: the training output folder")
    if not isinstance(self.output_dir, str) or not self.output_dir:
      raise ValueError("output_dir must be a non-empty path for the evaluation outputs")
    tasks = (self.tasks,) if isinstance(self.tasks, str) else tuple(self.tasks)
    object.__setattr__(self, "tasks", tasks)
    unknown = [task for task in tasks if task not in (*runs_lib.TASKS, PCI_TASK)]
    if unknown:
      raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))}; choose from"
                       f" {', '.join((*runs_lib.TASKS, PCI_TASK))}")
    if len(set(tasks)) != len(tasks):
      raise ValueError(f"tasks {tasks} lists a task twice")
    if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not (
        math.isfinite(self.threshold) and 0.0 < self.threshold < 1.0):
      raise ValueError(f"threshold must be a probability strictly between 0 and 1, got {self.threshold!r}")
    object.__setattr__(self, "threshold", float(self.threshold))
    if not isinstance(self.allow_partial, bool):
      raise ValueError(f"allow_partial must be True or False, got {self.allow_partial!r}")
    if isinstance(self.num_bootstrap, bool) or not isinstance(self.num_bootstrap, int) or self.num_bootstrap < 0:
      raise ValueError(f"num_bootstrap must be an integer >= 0 (0 skips the CIs), got {self.num_bootstrap!r}")
    if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
      raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")


def tensorboard_dir(config: EvaluateConfig) -> str:
  return io_utils.join(config.runs_dir, *TENSORBOARD_SUBDIR)


def _csv_number(value: Any) -> Any:
  """Floats as repr (round-trips exactly), NaN as an empty field."""
  if isinstance(value, float):
    return "" if not math.isfinite(value) else repr(value)
  return value


def _patient_prediction_rows(evaluations, threshold: float, conformal_evaluations=None):
  """patient_predictions.csv's rows; with `conformal_evaluations` (task -> ConformalEvaluation) each row also has
  its conformal answer and alpha (a task without sets gets empty fields)."""
  for evaluation in evaluations:
    task = evaluation.task_runs.task
    own = grid_statistics.own_thresholds(evaluation.task_runs)  # the cells' own thresholds, if they carry them
    sets = (conformal_evaluations or {}).get(task)
    for (repeat, fold), cell in sorted(evaluation.task_runs.cells.items()):
      here = own[(repeat, fold)] if own else threshold
      for patient_id, label, probability in sorted(
          zip(cell.patient_ids, cell.patient_labels.tolist(), cell.patient_probabilities.tolist())):
        row = (task, repeat, fold, patient_id, label, repr(probability), int(probability >= here))
        if conformal_evaluations:
          row += ((sets.answers[(repeat, fold, patient_id)], repr(sets.alpha)) if sets else ("", ""))
        yield row


def _conformal_evaluations(config: EvaluateConfig, evaluations) -> dict:
  """task -> its ConformalEvaluation, for the tasks with an alpha (config's, else the runs'); also puts each
  summary in the task's summary entry under "conformal"."""
  result = {}
  for evaluation in evaluations:
    try:
      alpha = config.conformal_alpha or conformal_evaluation.runs_alpha(evaluation.task_runs)
    except ValueError as error:
      raise RunsError(str(error)) from None
    if alpha is None:
      continue
    logger.info("task %s: conformal sets at alpha %g", evaluation.task_runs.task, alpha)
    checked = conformal_evaluation.evaluate_conformal(evaluation.task_runs, alpha, config.threshold,
                                                      config.num_bootstrap, config.seed)
    evaluation.summary["conformal"] = checked.summary
    result[evaluation.task_runs.task] = checked
  return result


def evaluate_runs(config: EvaluateConfig) -> dict:
  """Evaluates the runs below config.runs_dir and writes every output.

  Args:
    config: the evaluation settings.

  Returns:
    The summary: task -> its entry (the content of summary.json, None where a value is undefined).

  Raises:
    RunsError: missing, duplicate or inconsistent run artifacts (one line naming the file).
    PdxError: the output folder cannot be written.
  """
  # Validate the inputs first (reading only), so a bad --runs_dir leaves no half-made output folder.
  region_roots = pci.find_region_grids(config.runs_dir) if not config.tasks or PCI_TASK in config.tasks else []
  if PCI_TASK in config.tasks and not region_roots:
    raise RunsError(f"no {PCI_TASK} grid (splits.json of task {PCI_TASK}) below {config.runs_dir}; train"
                    f" --task={PCI_TASK} or drop it from --tasks")
  if len(region_roots) > 1:
    raise RunsError(f"two {PCI_TASK} grids below {config.runs_dir}: {region_roots[0]} and {region_roots[1]}; point"
                    " --runs_dir at one")
  patient_tasks = tuple(task for task in config.tasks if task != PCI_TASK)
  task_runs = ({} if region_roots and (config.tasks == (PCI_TASK,) or not _has_patient_tasks(config.runs_dir))
               else runs_lib.load_runs(config.runs_dir, patient_tasks, config.allow_partial))
  regions = None
  if region_roots:
    regions = pci.evaluate_regions(region_roots[0], num_bootstrap=config.num_bootstrap, seed=config.seed,
                                   allow_partial=config.allow_partial,
                                   head_scores=pci.head_scores_from_runs(task_runs))
  io_utils.check_writable(config.output_dir)
  io_utils.atomic_write_json(io_utils.join(config.output_dir, CONFIG_FILE), configs.to_dict(config))
  evaluations = []
  for task, runs in task_runs.items():
    logger.info("evaluating task %s: %d of %d cells", task, len(runs.cells), len(runs.expected_cells))
    evaluation = grid_statistics.evaluate_task(runs, config.threshold, config.num_bootstrap, config.seed)
    evaluations.append(clinical.extend_grid_evaluation(evaluation, config.num_bootstrap, config.seed))
  conformal_evaluations = _conformal_evaluations(config, evaluations)
  summary = {evaluation.task_runs.task: evaluation.summary for evaluation in evaluations}
  output = config.output_dir
  if regions is not None:
    figure = pci.write_outputs(output, regions[0], regions[1], FIGURES_FOLDER)
    io_utils.atomic_write_json(io_utils.join(output, SUMMARY_FILE), {**summary, PCI_TASK: regions[0]})
    if not evaluations:  # a regions grid alone: its section is the report
      io_utils.atomic_write_text(io_utils.join(output, REPORT_MARKDOWN_FILE),
                                 "# pdx-tf evaluation report\n\n" + pci.markdown_section(regions[0], figure))
      return {PCI_TASK: regions[0]}
  else:
    io_utils.atomic_write_json(io_utils.join(output, SUMMARY_FILE), summary)
  io_utils.atomic_write_csv(io_utils.join(output, PATIENT_PREDICTIONS_FILE),
                            PATIENT_PREDICTIONS_HEADER + (CONFORMAL_COLUMNS if conformal_evaluations else ()),
                            _patient_prediction_rows(evaluations, config.threshold, conformal_evaluations))
  io_utils.atomic_write_csv(
      io_utils.join(output, CELL_METRICS_FILE), CELL_METRICS_HEADER,
      ([_csv_number(row[column]) for column in CELL_METRICS_HEADER]
       for evaluation in evaluations for row in evaluation.rows))
  figures = report.make_figures(evaluations)
  if conformal_evaluations:
    figures[conformal_evaluation.FIGURE_NAME] = conformal_evaluation.conformal_figure(
        list(conformal_evaluations.values()))
  figure_paths = {}
  for name, png in figures.items():
    relative = f"{FIGURES_FOLDER}/{name}.png"
    io_utils.atomic_write_bytes(io_utils.join(output, FIGURES_FOLDER, f"{name}.png"), png)
    figure_paths[name] = relative
  markdown = report.render_markdown(summary, figure_paths, config.runs_dir)
  if regions is not None:
    markdown += "\n" + pci.markdown_section(regions[0], figure)
  io_utils.atomic_write_text(io_utils.join(output, REPORT_MARKDOWN_FILE), markdown)
  io_utils.atomic_write_text(io_utils.join(output, REPORT_HTML_FILE),
                             report.render_html(summary, figures, config.runs_dir))
  io_utils.atomic_write_text(
      io_utils.join(output, model_card.MODEL_CARD_FILE),
      model_card.render_model_card({evaluation.task_runs.task: evaluation for evaluation in evaluations},
                                   runs_dir=config.runs_dir))
  tensorboard.write_tensorboard(tensorboard_dir(config), evaluations)
  return summary if regions is None else {**summary, PCI_TASK: regions[0]}


def _has_patient_tasks(runs_dir: str) -> bool:
  """Whether runs_dir holds a grid of a patient-level task (p, sb or p,sb) beside its regions grid."""
  for folder, _, files in tf.io.gfile.walk(runs_dir):
    if SPLITS_FILE in files and io_utils.read_json(io_utils.join(folder, SPLITS_FILE)).get("task") != PCI_TASK:
      return True
  return False


def evaluate_predictions(config: external.ExternalConfig) -> dict:
  """External validation: evaluates a cohort's predictions CSV and writes every output.

  Writes config.json, summary.json (task -> entry with the cross-validation summary's metric keys, CIs,
  calibration, subgroups, covariate baselines, decision curve and the drift-flagged patients; with runs_dir also
  `internal_cross_validation`), flagged_patients.csv, report.md, report.html, model_card.md and figures/ to
  config.output_dir.

  Args:
    config: the external-validation settings.

  Returns:
    The summary (the content of summary.json).

  Raises:
    RunsError: a bad predictions CSV (one line naming the file and the column or row) or bad run artifacts.
  """
  rows, covariates = external.read_predictions(config.predictions_path)
  present = [task for task in runs_lib.TASKS if any(row.task == task for row in rows)]
  tasks = list(config.tasks) or present
  absent = [task for task in tasks if task not in present]
  if absent:
    raise RunsError(f"{config.predictions_path} has no rows for task(s) {', '.join(absent)} (it has "
                    f"{', '.join(present)}); drop them from --tasks")
  internal = external.internal_summaries(config, tasks)  # validates --runs_dir before anything is written
  io_utils.check_writable(config.output_dir)
  io_utils.atomic_write_json(io_utils.join(config.output_dir, CONFIG_FILE), configs.to_dict(config))
  summary, data = {}, {}
  for task in tasks:
    task_rows = [row for row in rows if row.task == task]
    logger.info("external validation of task %s: %d rows", task, len(task_rows))
    summary[task] = external.evaluate_task(task, task_rows, covariates, config.threshold, config.num_bootstrap,
                                           config.seed)
    labelled = sorted((row for row in task_rows if row.label is not None), key=lambda row: row.patient_id)
    data[task] = (np.asarray([row.label for row in labelled], dtype=np.int64),
                  np.asarray([row.probability for row in labelled], dtype=np.float64))
    try:
      coverage = conformal_evaluation.external_coverage(task, task_rows, config.conformal_alpha,
                                                        config.num_bootstrap, config.seed)
    except ValueError as error:
      raise RunsError(f"{config.predictions_path}: {error}") from None
    if coverage is not None:
      summary[task]["conformal"] = coverage
      (logger.warning if coverage["shortfall"] else logger.info)("%s", coverage["message"])
    if task in internal:
      summary[task]["internal_cross_validation"] = internal[task].summary
  output = config.output_dir
  io_utils.atomic_write_json(io_utils.join(output, SUMMARY_FILE), summary)
  io_utils.atomic_write_csv(
      io_utils.join(output, external.FLAGGED_PATIENTS_FILE), external.FLAGGED_PATIENTS_HEADER,
      ([row.task, row.patient_id, "" if row.label is None else row.label, repr(row.probability),
        int(row.probability >= config.threshold), external.DRIFT_SEPARATOR.join(row.drift_flags)]
       for row in rows if row.task in summary and row.drift_flags))
  internal_entries = {task: evaluation.summary for task, evaluation in internal.items()}
  figures = report.make_external_figures(data, summary)
  figure_paths = {}
  for name, png in figures.items():
    io_utils.atomic_write_bytes(io_utils.join(output, FIGURES_FOLDER, f"{name}.png"), png)
    figure_paths[name] = f"{FIGURES_FOLDER}/{name}.png"
  external_entries = {task: {key: value for key, value in entry.items() if key != "internal_cross_validation"}
                      for task, entry in summary.items()}
  io_utils.atomic_write_text(io_utils.join(output, REPORT_MARKDOWN_FILE),
                             report.render_external_markdown(external_entries, internal_entries, figure_paths,
                                                             config.predictions_path))
  io_utils.atomic_write_text(io_utils.join(output, REPORT_HTML_FILE),
                             report.render_external_html(external_entries, internal_entries, figures,
                                                         config.predictions_path))
  io_utils.atomic_write_text(io_utils.join(output, model_card.MODEL_CARD_FILE),
                             model_card.render_model_card(internal, external_entries, runs_dir=config.runs_dir,
                                                          predictions_path=config.predictions_path))
  return summary
