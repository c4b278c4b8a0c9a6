"""The paper table (plain text), the markdown report and a self-contained HTML report with PNG figures.

Everything here reads the JSON-safe summary (None where a metric is undefined) plus the pooled predictions
for the curves. The HTML embeds its figures as base64 PNGs and has no external src/href, so it can be mailed
or archived as one file.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # pylint: disable=wrong-import-position
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pdx_tf.evaluation import conformal_evaluation  # noqa: E402
from pdx_tf.evaluation import metrics as metrics_lib  # noqa: E402
from pdx_tf.evaluation.grid_statistics import TaskEvaluation  # noqa: E402

MODEL_NAMES = {"p": "P-Model", "sb": "SB-Model"}
TASK_DESCRIPTIONS = {"p": "any peritoneal dissemination", "sb": "small-bowel dissemination"}
# Published results (Jikei University, 2026), on the paper's own private cohort; no AUC was published.
PAPER_RESULTS = {
    "p": {"sensitivity": 0.688, "specificity": 0.858, "accuracy": 0.773, "auc": None},
    "sb": {"sensitivity": 0.864, "specificity": 0.775, "accuracy": 0.819, "auc": None},
}
PAPER_TABLE_METRICS = ("sensitivity", "specificity", "accuracy", "auc")
METRIC_LABELS = {
    "sensitivity": "Sensitivity", "specificity": "Specificity", "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy", "ppv": "PPV", "npv": "NPV", "f1": "F1", "auc": "ROC AUC",
    "brier": "Brier score",
}
PERCENT_METRICS = frozenset(metrics_lib.METRIC_NAMES) - {"auc", "brier"}
FIGURE_DPI = 110


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_value(metric: str, value: Any) -> str:
  """Percent with one decimal for rates, three decimals for AUC and Brier; n/a when undefined."""
  if not _is_number(value):
    return "n/a"
  return f"{100.0 * value:.1f}" if metric in PERCENT_METRICS else f"{value:.3f}"


def with_interval(metric: str, estimate: Any, low: Any, high: Any) -> str:
  if not _is_number(estimate):
    return "n/a"
  if not (_is_number(low) and _is_number(high)):
    return format_value(metric, estimate)
  return f"{format_value(metric, estimate)} ({format_value(metric, low)}-{format_value(metric, high)})"


def _task_source(task_summary: Mapping[str, Any]) -> str:
  source = f"this run ({task_summary['n_cells']} models)"
  if task_summary.get("partial"):
    source += f" PARTIAL {task_summary['n_cells']}/{task_summary['n_expected_cells']} cells"
  return source


def paper_table_rows(summary: Mapping[str, Any]) -> list[list[str]]:
  """[model, source, sensitivity, specificity, accuracy, AUC] rows: this run, then the paper, per task."""
  rows = []
  for task, task_summary in summary.items():
    if task not in MODEL_NAMES:
      continue
    intervals = task_summary.get("per_cell_ci95", {})
    cells = [with_interval(metric, task_summary["per_cell"][metric]["mean"],
                            intervals.get(metric, {}).get("low"), intervals.get(metric, {}).get("high"))
             for metric in PAPER_TABLE_METRICS]
    rows.append([MODEL_NAMES[task], _task_source(task_summary)] + cells)
    paper = PAPER_RESULTS[task]
    rows.append([MODEL_NAMES[task], "paper (own private cohort)"]
                + [format_value(metric, paper[metric]) for metric in PAPER_TABLE_METRICS])
  return rows


PAPER_TABLE_HEADER = ["Model", "Source", "Sensitivity %", "Specificity %", "Accuracy %", "AUC"]


def _caption_threshold(tasks: Mapping[str, Mapping[str, Any]]) -> str:
  """"at threshold 0.5" when every task was scored at one threshold; else each task's, named (a joint grid's heads
  each fit their own, and the cells' own thresholds differ from cell to cell: their mean is given)."""
  own = {task: (f"each model's own ({', '.join(task_summary['threshold_rules'])}, mean"
                f" {task_summary['threshold']:.3g})") if task_summary.get("threshold_source") == "cells"
         else f"{task_summary['threshold']:g}" for task, task_summary in tasks.items()}
  if len(set(own.values())) <= 1:
    return f"at threshold {next(iter(own.values()), '0.5')}"
  return "at its task's threshold (" + "; ".join(f"{MODEL_NAMES[task]}: {text}" for task, text in own.items()) + ")"


def paper_table_caption(summary: Mapping[str, Any]) -> str:
  tasks = {task: task_summary for task, task_summary in summary.items() if task in MODEL_NAMES}
  caption = (f"Mean over the models, each scored on its own held-out fold {_caption_threshold(tasks)} "
             "(95 % CI: patient bootstrap). The paper's values are from its own private cohort and are "
             "not directly comparable; it published no AUC.")
  if any(task_summary.get("partial") for task_summary in tasks.values()):
    caption = "PARTIAL GRID (some cells missing). " + caption
  return caption


def format_paper_table(summary: dict) -> str:
  """The paper's table as plain text: P-Model and SB-Model rows, this run beside the published values.

  Args:
    summary: the dict returned by evaluate_runs (the content of summary.json).

  Returns:
    A multi-line string ending in a newline.
  """
  rows = [PAPER_TABLE_HEADER] + paper_table_rows(summary)
  widths = [max(len(row[column]) for row in rows) for column in range(len(PAPER_TABLE_HEADER))]
  lines = []
  for index, row in enumerate(rows):
    lines.append("  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip())
    if index == 0:
      lines.append("  ".join("-" * width for width in widths))
  return "\n".join([paper_table_caption(summary)] + lines) + "\n"


# ----------------------------------------------------------------------------------------------- figures


def _png(figure) -> bytes:
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
  plt.close(figure)
  return buffer.getvalue()


def _paper_point(task: str) -> tuple[float, float]:
  paper = PAPER_RESULTS[task]
  return 1.0 - paper["specificity"], paper["sensitivity"]


def roc_figure(evaluations: Sequence[TaskEvaluation]) -> bytes:
  """ROC per task: each repeat's pooled out-of-fold curve faint, the vertical mean bold."""
  figure, axes = plt.subplots(1, len(evaluations), figsize=(5.2 * len(evaluations), 5.0), squeeze=False)
  grid = np.linspace(0.0, 1.0, 201)
  for axis, evaluation in zip(axes[0], evaluations):
    task = evaluation.task_runs.task
    curves = []
    for pool in evaluation.pools:
      if pool.labels.min() == pool.labels.max():
        continue
      false_positive_rate, true_positive_rate, _ = metrics_lib.roc_curve(pool.labels, pool.probabilities)
      axis.plot(false_positive_rate, true_positive_rate, color="tab:blue", alpha=0.18, linewidth=0.9)
      curves.append(np.interp(grid, false_positive_rate, true_positive_rate))
    summary = evaluation.summary
    if curves:
      mean_curve = np.mean(curves, axis=0)
      mean_curve[0] = 0.0
      auc = summary["per_repeat"]["auc"]["mean"]
      axis.plot(grid, mean_curve, color="tab:blue", linewidth=2.6,
                label=f"mean of {len(curves)} repeats (AUC {format_value('auc', auc)})")
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    sensitivity = summary["per_repeat"]["sensitivity"]["mean"]
    specificity = summary["per_repeat"]["specificity"]["mean"]
    if _is_number(sensitivity) and _is_number(specificity):
      axis.plot(1 - specificity, sensitivity, "o", color="tab:orange", markersize=9,
                label=f"this run at threshold {summary['threshold']:g}")
    paper_x, paper_y = _paper_point(task)
    axis.plot(paper_x, paper_y, "*", color="tab:red", markersize=15, label="paper (own private cohort)")
    axis.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity (false positive rate)",
             ylabel="sensitivity (true positive rate)", aspect="equal")
    axis.set_title(f"{MODEL_NAMES[task]}: ROC, patient level" + (" (PARTIAL)" if summary["partial"] else ""))
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=8.5)
  return _png(figure)


def metrics_box_figure(evaluations: Sequence[TaskEvaluation]) -> bytes:
  """Box + strip plot of sensitivity, specificity and accuracy over the models (patient level, per cell)."""
  shown = ("sensitivity", "specificity", "accuracy")
  figure, axes = plt.subplots(1, len(evaluations), figsize=(5.2 * len(evaluations), 4.6), squeeze=False)
  for axis, evaluation in zip(axes[0], evaluations):
    task = evaluation.task_runs.task
    rows = [row for row in evaluation.rows if row["level"] == "patient"]
    data = []
    for metric in shown:
      values = np.asarray([row[metric] for row in rows], dtype=np.float64)
      data.append(100.0 * values[np.isfinite(values)])
    axis.boxplot(data, widths=0.5, showfliers=False, medianprops={"color": "black", "linewidth": 1.5})
    rng = np.random.default_rng([0, len(rows)])  # jitter only; fixed so the figure is reproducible
    for position, values in enumerate(data, start=1):
      axis.scatter(position + rng.uniform(-0.17, 0.17, values.size), values, s=10, alpha=0.35,
                   color="tab:blue", zorder=3)
    for position, metric in enumerate(shown, start=1):
      axis.plot(position, 100.0 * PAPER_RESULTS[task][metric], "D", color="tab:red", markersize=9, zorder=4,
                label="paper (own private cohort)" if position == 1 else None)
      mean = evaluation.summary["per_cell"][metric]["mean"]
      if _is_number(mean):
        axis.plot(position, 100.0 * mean, "_", color="tab:orange", markersize=28, markeredgewidth=3, zorder=4,
                  label="mean over models" if position == 1 else None)
    axis.set_xticks(range(1, len(shown) + 1), [METRIC_LABELS[metric] for metric in shown])
    axis.set(ylim=(-3, 103), ylabel="% (each dot is one model on its held-out fold)")
    partial = " (PARTIAL)" if evaluation.summary["partial"] else ""
    axis.set_title(f"{MODEL_NAMES[task]}: {len(rows)} models, threshold {evaluation.summary['threshold']:g}"
                   + partial)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(loc="lower left", fontsize=8.5)
  return _png(figure)


def calibration_figure(evaluations: Sequence[TaskEvaluation], num_bins: int = 10) -> bytes:
  """Reliability diagram over all repeats' out-of-fold predictions, with the score histogram below."""
  figure, axes = plt.subplots(2, len(evaluations), figsize=(5.2 * len(evaluations), 6.4), squeeze=False,
                              gridspec_kw={"height_ratios": [3, 1.2]}, sharex="col")
  for column, evaluation in enumerate(evaluations):
    task = evaluation.task_runs.task
    labels = np.concatenate([pool.labels for pool in evaluation.pools])
    probabilities = np.concatenate([pool.probabilities for pool in evaluation.pools])
    bins = metrics_lib.calibration_bins(labels, probabilities, num_bins)
    top, bottom = axes[0][column], axes[1][column]
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    top.plot([row["mean_probability"] for row in bins], [row["observed_fraction"] for row in bins], "-o",
             color="tab:blue", label=f"{num_bins} equal-width bins")
    for row in bins:
      top.annotate(str(row["count"]), (row["mean_probability"], row["observed_fraction"]),
                   textcoords="offset points", xytext=(4, -11), fontsize=7, color="dimgrey")
    brier = evaluation.summary["per_repeat"]["brier"]["mean"]
    top.set(xlim=(0, 1), ylim=(-0.02, 1.02), ylabel="observed fraction positive")
    top.set_title(f"{MODEL_NAMES[task]}: calibration (Brier {format_value('brier', brier)})")
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=8.5)
    edges = np.linspace(0, 1, 21)
    bottom.hist([probabilities[labels == 0], probabilities[labels == 1]], bins=edges, stacked=True,
                color=["tab:green", "tab:red"], label=["negative", "positive"])
    bottom.axvline(evaluation.summary["threshold"], color="black", linewidth=1, linestyle=":")
    bottom.set(xlabel="predicted probability (patient level, all repeats)", ylabel="patients x repeats")
    bottom.legend(fontsize=8, loc="upper center")
  return _png(figure)


def subgroup_figure(evaluations: Sequence[TaskEvaluation], metric: str = "accuracy") -> bytes | None:
  """Horizontal bars of a metric (mean +- SD over repeats) for every covariate group; None without covariates."""
  panels = [evaluation for evaluation in evaluations if evaluation.summary["subgroups"]]
  if not panels:
    return None
  heights = [sum(len(entry["groups"]) + 1 for entry in evaluation.summary["subgroups"].values())
             for evaluation in panels]
  figure, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 0.9 + 0.32 * max(heights)),
                              squeeze=False)
  palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for axis, evaluation in zip(axes[0], panels):
    labels, means, errors, colours, position = [], [], [], [], 0
    positions = []
    for column_index, (column, entry) in enumerate(evaluation.summary["subgroups"].items()):
      for group in entry["groups"]:
        values = group["metrics"][metric]
        means.append(100.0 * values["mean"] if _is_number(values["mean"]) else np.nan)
        errors.append(100.0 * values["sd"] if _is_number(values["sd"]) else 0.0)
        labels.append(f"{column}: {group['group']}  (n={group['n_patients']}, pos={group['n_positive']})")
        colours.append(palette[column_index % len(palette)])
        positions.append(position)
        position += 1
      position += 1  # a gap between covariates
    axis.barh(positions, np.nan_to_num(means), xerr=errors, color=colours, alpha=0.8, capsize=3)
    for y_position, mean in zip(positions, means):
      axis.text(1.5, y_position, "n/a" if np.isnan(mean) else f"{mean:.0f}", va="center", fontsize=8,
                color="white" if not np.isnan(mean) and mean > 12 else "black")
    overall = evaluation.summary["per_repeat"][metric]["mean"]
    if _is_number(overall):
      axis.axvline(100.0 * overall, color="black", linestyle="--", linewidth=1, label="all patients")
      axis.legend(loc="best", fontsize=8)
    axis.set_yticks(positions, labels, fontsize=8.5)
    axis.invert_yaxis()
    axis.set(xlim=(0, 100), xlabel=f"{METRIC_LABELS[metric].lower()} %, mean +- SD over repeats")
    axis.set_title(f"{MODEL_NAMES[evaluation.task_runs.task]}: {METRIC_LABELS[metric].lower()} by subgroup")
    axis.grid(axis="x", alpha=0.3)
  figure.tight_layout()
  return _png(figure)


def decision_curve_figure(curves: Mapping[str, Mapping[str, Any]], title_suffix: str = "") -> bytes:
  """Net benefit against the threshold probability: the model, treat-all and treat-none, one panel per task.

  Args:
    curves: task -> a summary's `decision_curve` entry.
    title_suffix: appended to each panel's title (e.g. "external").
  """
  figure, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 4.4), squeeze=False)
  for axis, (task, curve) in zip(axes[0], curves.items()):
    thresholds = np.asarray(curve["thresholds"], dtype=np.float64)
    model = np.asarray([np.nan if value is None else value for value in curve["model"]], dtype=np.float64)
    treat_all = np.asarray([np.nan if value is None else value for value in curve["treat_all"]], dtype=np.float64)
    label = "model" if curve["n_sets"] == 1 else f"model (mean of {curve['n_sets']} repeats)"
    axis.plot(thresholds, model, color="tab:blue", linewidth=2.2, label=label)
    axis.plot(thresholds, treat_all, color="tab:grey", linewidth=1.3, label="treat all")
    axis.axhline(0.0, color="black", linewidth=1.0, linestyle="--", label="treat none")
    top = np.nanmax(np.r_[model, treat_all, 0.0])
    axis.set(xlim=(0, 1), ylim=(-0.05 * max(top, 0.1), 1.1 * max(top, 0.05)), xlabel="threshold probability pt",
             ylabel="net benefit")
    axis.set_title(f"{MODEL_NAMES.get(task, task)}: decision curve{title_suffix}")
    axis.grid(alpha=0.3)
    axis.legend(loc="upper right", fontsize=8.5)
  return _png(figure)


def make_figures(evaluations: Sequence[TaskEvaluation]) -> dict[str, bytes]:
  """File stem -> PNG bytes, in report order."""
  figures = {
      "roc": roc_figure(evaluations),
      "metrics_box": metrics_box_figure(evaluations),
      "calibration": calibration_figure(evaluations),
  }
  curves = {evaluation.task_runs.task: evaluation.summary["decision_curve"] for evaluation in evaluations
            if "decision_curve" in evaluation.summary}
  if curves:
    figures["decision_curve"] = decision_curve_figure(curves)
  subgroups = subgroup_figure(evaluations)
  if subgroups is not None:
    figures["subgroups"] = subgroups
  return figures


FIGURE_CAPTIONS = {
    "roc": ("ROC curves at patient level. Faint: each repeat's pooled out-of-fold predictions; bold: their "
            "vertical mean. Orange: this run's mean operating point; red star: the paper's reported point "
            "(its own cohort)."),
    "metrics_box": ("Sensitivity, specificity and accuracy of every model on its own held-out fold (the "
                    "paper's unit). Red diamonds: the paper's published values."),
    "calibration": "Calibration of the patient-level probabilities, all repeats pooled; counts beside points.",
    "subgroups": ("Accuracy by covariate subgroup (mean +- SD over repeats of the pooled out-of-fold "
                  "predictions). Numeric covariates are binned as described in Methods."),
    conformal_evaluation.FIGURE_NAME: conformal_evaluation.FIGURE_CAPTION,
    "decision_curve": ("Decision curve: net benefit = TP/n - FP/n * pt/(1-pt) when every patient with probability "
                       ">= pt is treated, against treating all and treating none."),
}

# ------------------------------------------------------------------------------------------------ text

METHODS_NOTES = (
    "Decision: a patient (or slice) is positive when its probability >= the threshold. The Youden-optimal "
    "threshold is reported separately and is descriptive only (chosen on the data it is scored on).",
    "Per cell: each model scored on its own held-out fold (the paper's unit). Per repeat: the folds' "
    "out-of-fold predictions of one repeat pooled, so each patient is scored once per repeat.",
    "Undefined values (e.g. sensitivity of a fold without positives, AUC with one class) are excluded from "
    "mean/SD/median/percentiles; `n` is the number of defined values. SD is the sample SD (ddof=1); "
    "percentiles use linear interpolation.",
    "95 % CI: patients resampled with replacement; the same resample weights every model, so a patient's "
    "predictions in all repeats move together; percentile interval of the replicated mean.",
    "Subgroups: a column named pci uses fixed clinical bins 0, 1-10, 11-20, >20; other numeric columns with "
    "more than 5 distinct values are split at the tertiles (1/3 and 2/3 quantiles) of the per-patient "
    "values; everything else is one group per value. Subgroup metrics are per repeat over the group's "
    "patients.",
    "The paper's values come from its own private cohort; this run's cohort differs, so the comparison is "
    "indicative only.",
    "Calibration: logistic recalibration label ~ intercept + slope * logit(probability) (maximum likelihood; "
    "probabilities clipped to [1e-6, 1 - 1e-6]); slope 1 and intercept 0 are perfect, slope < 1 means "
    "overconfident. Calibration-in-the-large is the intercept with the slope fixed at 1. Undefined (n/a) "
    "when the classes' scores do not overlap.",
    "Covariate baselines: each numeric covariate, and each covariate whose values are ordinal words "
    "(none < trace < small < mild < moderate < medium < large < massive < severe), used alone as the score; "
    "its AUC and 95 % CI come from the same patient resamples as the models'. Patients missing the value "
    "are left out of that baseline.",
    "Decision curve (Vickers & Elkin 2006): net benefit = TP/n - FP/n * pt/(1-pt), treating probability >= "
    "pt, for pt = 0.01 ... 0.99; treat-all = prevalence - (1 - prevalence) * pt/(1-pt), treat-none = 0.",
    "Failure analysis: the subgroups (at least 3 patients of the class concerned) with the lowest "
    "sensitivity and the lowest specificity.",
)


def _summary_table_rows(block: Mapping[str, Mapping[str, Any]], intervals: Mapping[str, Any] | None
                        ) -> list[list[str]]:
  rows = []
  for metric in metrics_lib.METRIC_NAMES:
    values = block[metric]
    mean_sd = format_value(metric, values["mean"])
    if _is_number(values["sd"]):
      mean_sd += f" +- {format_value(metric, values['sd'])}"
    row = [METRIC_LABELS[metric], mean_sd, format_value(metric, values["median"]),
           f"{format_value(metric, values['p2_5'])} - {format_value(metric, values['p97_5'])}", str(values["n"])]
    if intervals is not None:
      interval = intervals[metric]
      row.append(f"{format_value(metric, interval['low'])} - {format_value(metric, interval['high'])}")
    rows.append(row)
  return rows


SUMMARY_HEADER = ["Metric", "Mean +- SD", "Median", "2.5-97.5 percentile", "n defined"]


def _number(value: Any, digits: int = 3) -> str:
  return f"{value:.{digits}f}" if _is_number(value) else "n/a"


def clinical_blocks(entry: Mapping[str, Any], over_repeats: bool) -> list[tuple[str, Any]]:
  """Report blocks for calibration, covariate baselines, the decision-curve table and the failure analysis.

  Args:
    entry: one task's summary (grid or external): keys calibration, covariate_baselines, decision_curve,
      failure_analysis.
    over_repeats: the grid's values are statistics over repeats ({mean, sd}); the external ones are numbers.
  """
  blocks: list[tuple[str, Any]] = []

  def value(item):
    return item["mean"] if over_repeats and isinstance(item, Mapping) else item

  calibration = entry.get("calibration")
  if calibration:
    rows = []
    for name, label in (("slope", "Calibration slope"), ("intercept", "Calibration intercept"),
                        ("calibration_in_the_large", "Calibration-in-the-large")):
      item = calibration[name]
      text = _number(value(item))
      if over_repeats and _is_number(item.get("sd")):
        text += f" +- {_number(item['sd'])}"
      rows.append([label, text])
    caption = ("Calibration (logistic recalibration of logit(probability); perfect: slope 1, intercept 0)"
               + ("; mean +- SD over repeats." if over_repeats else "."))
    blocks.append(("table", (caption, ["Quantity", "Value"], rows)))
  baselines = entry.get("covariate_baselines")
  if baselines:
    model = baselines["model_auc"]
    rows = [["model", "predicted probability", "", with_interval("auc", model["estimate"], model["low"],
                                                                    model["high"])]]
    for column, item in baselines["covariates"].items():
      auc = item["auc"]
      rows.append([f"{column} alone", item["kind"], f"{item['n_patients']} ({item['n_missing']} missing)",
                   with_interval("auc", auc["estimate"], auc["low"], auc["high"])])
    blocks.append(("table", ("Covariate baselines: each numeric or ordinal covariate alone as the score, beside "
                             "the model (AUC, 95 % patient-bootstrap CI).",
                             ["Score", "Kind", "Patients", "AUC (95 % CI)"], rows)))
  curve = entry.get("decision_curve")
  if curve:
    rows = [[f"{row['threshold']:g}", _number(row["model"]), _number(row["treat_all"]), _number(row["treat_none"])]
            for row in curve["table"]]
    blocks.append(("table", (f"Decision curve at selected thresholds ({curve['rule']}).",
                             ["Threshold pt", "Model", "Treat all", "Treat none"], rows)))
  burden_entry = entry.get("burden")
  if burden_entry and burden_entry.get("strata"):
    rows = []
    for stratum in burden_entry["strata"]:
      metrics = stratum["metrics"]
      rows.append([stratum["stratum"], stratum["range"], str(stratum["n_positive"]), str(stratum["n_negative"])]
                  + [with_interval(metric, metrics[metric]["estimate"], metrics[metric]["low"],
                                   metrics[metric]["high"]) for metric in ("auc", "sensitivity", "accuracy")])
    missing = burden_entry.get("n_positive_missing", 0)
    blocks.append(("table", (f"Disease burden: the positives cut by `{burden_entry['column']}` ("
                             f"{burden_entry['rule']}). A low AUC in the low stratum means small-volume disease is"
                             " missed" + (f"; {missing} positives without a value are left out." if missing else "."),
                             ["Burden", "Range", "Positives", "Negatives", "AUC (95 % CI)", "Sensitivity % (95 % CI)",
                              "Accuracy % (95 % CI)"], rows)))
  failures = entry.get("failure_analysis")
  if failures:
    rows = []
    for metric in ("sensitivity", "specificity"):
      for item in failures[metric]:
        count_key = "n_positive" if metric == "sensitivity" else "n_negative"
        kind = "positive" if count_key == "n_positive" else "negative"
        rows.append([METRIC_LABELS[metric], f"{item['covariate']} = {item['group']}",
                     f"{item['n_patients']} ({item[count_key]} {kind})", format_value(metric, item[metric])])
    if rows:
      blocks.append(("table", ("Failure analysis: subgroups with the lowest sensitivity and specificity.",
                               ["Metric", "Subgroup", "Patients", "Value %"], rows)))
  return blocks


def _threshold_text(task_summary: Mapping[str, Any]) -> str:
  """The threshold used (the evaluation's, or each cell's own) and the calibration slope and intercept."""
  if task_summary.get("threshold_source") == "cells":
    spread = task_summary["cell_thresholds"]
    text = (f"threshold: each cell's own ({', '.join(task_summary['threshold_rules'])}; mean "
            f"{task_summary['threshold']:.3g}, SD {_number(spread['sd'])} over {spread['n']} cells)")
  else:
    text = f"threshold {task_summary['threshold']:g}"
  calibration = task_summary.get("calibration")
  if calibration and all(_is_number((calibration.get(name) or {}).get("mean")) for name in ("slope", "intercept")):
    text += (f"; calibration slope {_number(calibration['slope']['mean'])}, intercept "
             f"{_number(calibration['intercept']['mean'])} (mean over repeats)")
  return text


def _task_sections(summary: Mapping[str, Any]) -> list[tuple[str, list[tuple[str, Any]]]]:
  """(title, blocks) per task; a block is ("p", text) or ("table", (caption, header, rows))."""
  sections = []
  for task, task_summary in summary.items():
    if task not in MODEL_NAMES:
      continue
    blocks: list[tuple[str, Any]] = []
    facts = (f"Task `{task}` ({TASK_DESCRIPTIONS[task]}): {task_summary['n_cells']} of "
             f"{task_summary['n_expected_cells']} models ({task_summary['n_repeats']} repeats x "
             f"{task_summary['n_folds']} folds), {task_summary['n_patients']} patients "
             f"({task_summary['n_positive']} positive, {task_summary['n_negative']} negative), "
             f"{task_summary['n_slices']} slice predictions; {_threshold_text(task_summary)}; "
             f"split hash {task_summary['split_hash'][:12]}.")
    if task_summary["partial"]:
      missing = ", ".join(cell["name"] for cell in task_summary["missing_cells"])
      blocks.append(("warning", f"PARTIAL: missing cells {missing}. Every number below uses only the "
                                "complete cells."))
    blocks.append(("p", facts))
    rates = "Rates in %, AUC and Brier as fractions."
    blocks.append(("table", (f"Patient level, per cell (each model on its held-out fold). {rates} Last column: "
                             "95 % patient-bootstrap CI of the mean.",
                             SUMMARY_HEADER + ["95 % CI of mean"],
                             _summary_table_rows(task_summary["per_cell"], task_summary["per_cell_ci95"]))))
    blocks.append(("table", ("Patient level, per repeat (out-of-fold predictions pooled). Last column: 95 % "
                             "patient-bootstrap CI of the mean over repeats (pooled_ci95).",
                             SUMMARY_HEADER + ["95 % CI of mean"],
                             _summary_table_rows(task_summary["per_repeat"], task_summary["pooled_ci95"]))))
    blocks.append(("table", ("Slice level, per cell.", SUMMARY_HEADER,
                             _summary_table_rows(task_summary["slice_level"]["per_cell"], None))))
    blocks.append(("table", ("Slice level, per repeat (pooled).", SUMMARY_HEADER,
                             _summary_table_rows(task_summary["slice_level"]["per_repeat"], None))))
    youden = task_summary["youden"]
    youden_rows = [[name, format_value("auc" if name in ("threshold", "youden_index") else name,
                                       youden[name]["mean"]),
                    format_value("auc" if name in ("threshold", "youden_index") else name, youden[name]["sd"])]
                   for name in ("threshold", "sensitivity", "specificity", "youden_index")]
    blocks.append(("table", (f"Youden-optimal threshold per repeat: {youden['note']}.",
                             ["Quantity", "Mean over repeats", "SD"], youden_rows)))
    for column, entry in task_summary["subgroups"].items():
      rows = []
      for group in entry["groups"]:
        metrics = group["metrics"]
        rows.append([group["group"], str(group["n_patients"]), str(group["n_positive"]),
                     str(group["n_negative"])]
                    + [format_value(metric, metrics[metric]["mean"]) for metric in
                       ("accuracy", "sensitivity", "specificity", "auc")])
      blocks.append(("table", (f"Subgroups by `{column}` ({entry['rule']}); means over repeats.",
                               ["Group", "Patients", "Positive", "Negative", "Accuracy %", "Sensitivity %",
                                "Specificity %", "AUC"], rows)))
    blocks.extend(clinical_blocks(task_summary, over_repeats=True))
    blocks.extend(conformal_evaluation.report_blocks(task_summary))
    sections.append((f"{MODEL_NAMES[task]} ({TASK_DESCRIPTIONS[task]})", blocks))
  return sections


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  def line(cells):
    return "| " + " | ".join(str(cell).replace("|", "/") for cell in cells) + " |"
  return "\n".join([line(header), line(["---"] * len(header))] + [line(row) for row in rows])


def _is_partial(summary: Mapping[str, Any]) -> bool:
  return any(task_summary.get("partial") for task, task_summary in summary.items() if task in MODEL_NAMES)


def render_markdown(summary: Mapping[str, Any], figure_paths: Mapping[str, str], runs_dir: str) -> str:
  """The markdown report; figures are linked by relative path (the HTML embeds them)."""
  parts = ["# pdx-tf evaluation report", ""]
  if _is_partial(summary):
    parts += ["> **PARTIAL EVALUATION: some cells are missing; see each task.**", ""]
  parts += [f"Runs: `{runs_dir}`", "", "## Paper table", "", paper_table_caption(summary), "",
            _markdown_table(PAPER_TABLE_HEADER, paper_table_rows(summary)), ""]
  for title, blocks in _task_sections(summary):
    parts += [f"## {title}", ""]
    for kind, content in blocks:
      if kind == "p":
        parts += [content, ""]
      elif kind == "warning":
        parts += [f"> **{content}**", ""]
      else:
        caption, header, rows = content
        parts += [f"**{caption}**", "", _markdown_table(header, rows), ""]
  parts += ["## Figures", ""]
  for name, path in figure_paths.items():
    parts += [f"![{name}]({path})", "", FIGURE_CAPTIONS[name], ""]
  parts += ["## Methods", ""] + [f"- {note}" for note in METHODS_NOTES] + [""]
  return "\n".join(parts)


_CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; line-height: 1.45; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.4em 0 1.4em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: 0.3em; }
.warning { background: #fff3cd; border: 1px solid #e0b000; padding: 0.6em 1em; font-weight: 600; }
.paper td { background: #fafafa; color: #555; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #444; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def _html_table(caption: str, header: Sequence[str], rows: Sequence[Sequence[str]],
                row_classes: Sequence[str] | None = None) -> str:
  head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
  body = []
  for index, row in enumerate(rows):
    css = f' class="{row_classes[index]}"' if row_classes and row_classes[index] else ""
    body.append(f"<tr{css}>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>")
  return (f"<table><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead>"
          f"<tbody>{''.join(body)}</tbody></table>")


def _inline_code(text: str) -> str:
  """Escapes text and renders `backticks` as <code>."""
  pieces = html.escape(text).split("`")
  return "".join(f"<code>{piece}</code>" if index % 2 else piece for index, piece in enumerate(pieces))


def _html_sections_figures_methods(parts: list[str], sections, figures: Mapping[str, bytes],
                                   captions: Mapping[str, str], notes) -> str:
  """Appends the report's sections (paragraphs, warnings, tables), its figures (inline PNG) and its methods notes
  to `parts` and returns the finished HTML page (both reports end this way)."""
  for title, blocks in sections:
    parts.append(f"<h2>{html.escape(title)}</h2>")
    for kind, content in blocks:
      if kind == "p":
        parts.append(f"<p>{_inline_code(content)}</p>")
      elif kind == "warning":
        parts.append(f'<p class="warning">{html.escape(content)}</p>')
      else:
        caption, header, rows = content
        parts.append(_html_table(caption.replace("`", ""), header, rows))
  parts.append("<h2>Figures</h2>")
  for name, png in figures.items():
    encoded = base64.b64encode(png).decode("ascii")
    parts.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{encoded}">'
                 f"<figcaption>{html.escape(captions[name])}</figcaption></figure>")
  parts.append("<h2>Methods</h2><ul>" + "".join(f"<li>{_inline_code(note)}</li>" for note in notes)
               + "</ul></body></html>")
  return "\n".join(parts) + "\n"


def render_html(summary: Mapping[str, Any], figures: Mapping[str, bytes], runs_dir: str) -> str:
  """A self-contained HTML report: inline CSS, base64 PNG figures, no external src or href."""
  parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           "<title>pdx-tf evaluation report</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>pdx-tf evaluation report</h1>"]
  if _is_partial(summary):
    parts.append('<p class="warning">PARTIAL EVALUATION: some cells are missing; see each task.</p>')
  parts.append(f"<p>Runs: <code>{html.escape(runs_dir)}</code></p><h2>Paper table</h2>")
  table_rows = paper_table_rows(summary)
  parts.append(_html_table(paper_table_caption(summary), PAPER_TABLE_HEADER, table_rows,
                           ["paper" if row[1].startswith("paper") else "" for row in table_rows]))
  return _html_sections_figures_methods(parts, _task_sections(summary), figures, FIGURE_CAPTIONS, METHODS_NOTES)


# ------------------------------------------------------------------------------------ external validation

EXTERNAL_FIGURE_CAPTIONS = {
    "roc": ("External ROC curve at patient level (labelled patients); orange: the operating point at the "
            "threshold."),
    "calibration": ("External reliability diagram: observed fraction positive against the mean predicted "
                    "probability in 10 equal-width bins, with the logistic recalibration line; histogram below."),
    "decision_curve": FIGURE_CAPTIONS["decision_curve"],
}

EXTERNAL_METHODS_NOTES = (
    "Input: one row a task and patient from `python -m predict --manifest=...`; probability is the ensemble "
    "mean over the exported models. Rows without a label are counted and listed as predictions only; every "
    "metric uses the labelled rows.",
    "95 % CI: labelled patients resampled with replacement (percentile interval); the covariate baselines use "
    "the same resamples.",
    "Drift flags: reasons predict gave for an input unlike the training data (slice thickness, pixel spacing, "
    "slice count, body area, HU histogram). Flagged patients are listed, and their metrics given apart.",
) + METHODS_NOTES[4:5] + METHODS_NOTES[6:]  # all but the per-cell, CI and paper notes


def external_roc_figure(data: Mapping[str, tuple[np.ndarray, np.ndarray]], summary: Mapping[str, Any]) -> bytes:
  """One ROC panel per task from the labelled external predictions."""
  figure, axes = plt.subplots(1, len(data), figsize=(5.2 * len(data), 5.0), squeeze=False)
  for axis, (task, (labels, probabilities)) in zip(axes[0], data.items()):
    entry = summary[task]
    if labels.size and labels.min() != labels.max():
      false_positive_rate, true_positive_rate, _ = metrics_lib.roc_curve(labels, probabilities)
      axis.plot(false_positive_rate, true_positive_rate, color="tab:blue", linewidth=2.4,
                label=f"external (AUC {format_value('auc', entry['metrics']['auc'])})")
    sensitivity, specificity = entry["metrics"]["sensitivity"], entry["metrics"]["specificity"]
    if _is_number(sensitivity) and _is_number(specificity):
      axis.plot(1 - specificity, sensitivity, "o", color="tab:orange", markersize=9,
                label=f"threshold {entry['threshold']:g}")
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    axis.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="sensitivity", aspect="equal")
    axis.set_title(f"{MODEL_NAMES[task]}: external ROC ({entry['n_patients']} labelled patients)")
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=8.5)
  return _png(figure)


def external_calibration_figure(data: Mapping[str, tuple[np.ndarray, np.ndarray]],
                                summary: Mapping[str, Any]) -> bytes:
  """Reliability diagram, recalibration line and score histogram per task."""
  figure, axes = plt.subplots(2, len(data), figsize=(5.2 * len(data), 6.4), squeeze=False,
                              gridspec_kw={"height_ratios": [3, 1.2]}, sharex="col")
  grid = np.linspace(0.005, 0.995, 199)
  for column, (task, (labels, probabilities)) in enumerate(data.items()):
    entry = summary[task]
    top, bottom = axes[0][column], axes[1][column]
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    bins = entry["calibration_bins"]
    top.plot([row["mean_probability"] for row in bins], [row["observed_fraction"] for row in bins], "-o",
             color="tab:blue", label="10 equal-width bins")
    for row in bins:
      top.annotate(str(row["count"]), (row["mean_probability"], row["observed_fraction"]),
                   textcoords="offset points", xytext=(4, -11), fontsize=7, color="dimgrey")
    calibration = entry["calibration"]
    if _is_number(calibration["slope"]) and _is_number(calibration["intercept"]):
      logits = np.log(grid) - np.log1p(-grid)
      recalibrated = 1.0 / (1.0 + np.exp(-(calibration["intercept"] + calibration["slope"] * logits)))
      top.plot(grid, recalibrated, color="tab:red", linewidth=1.5,
               label=f"recalibration: slope {calibration['slope']:.2f}, intercept {calibration['intercept']:.2f}")
    top.set(xlim=(0, 1), ylim=(-0.02, 1.02), ylabel="observed fraction positive")
    top.set_title(f"{MODEL_NAMES[task]}: external calibration (Brier "
                  f"{format_value('brier', entry['metrics']['brier'])})")
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=8)
    edges = np.linspace(0, 1, 21)
    bottom.hist([probabilities[labels == 0], probabilities[labels == 1]], bins=edges, stacked=True,
                color=["tab:green", "tab:red"], label=["negative", "positive"])
    bottom.axvline(entry["threshold"], color="black", linewidth=1, linestyle=":")
    bottom.set(xlabel="predicted probability (labelled patients)", ylabel="patients")
    bottom.legend(fontsize=8, loc="upper center")
  return _png(figure)


def make_external_figures(data: Mapping[str, tuple[np.ndarray, np.ndarray]],
                          summary: Mapping[str, Any]) -> dict[str, bytes]:
  """File stem -> PNG bytes for the external report; `data` is task -> (labels, probabilities) of labelled rows."""
  return {
      "roc": external_roc_figure(data, summary),
      "calibration": external_calibration_figure(data, summary),
      "decision_curve": decision_curve_figure({task: summary[task]["decision_curve"] for task in data},
                                              " (external)"),
  }


def external_sections(summary: Mapping[str, Any], internal: Mapping[str, Any]
                      ) -> list[tuple[str, list[tuple[str, Any]]]]:
  """(title, blocks) per task of an external validation; internal: task -> CV summary entry (may be empty)."""
  sections = []
  for task, entry in summary.items():
    blocks: list[tuple[str, Any]] = []
    blocks.append(("p", f"Task `{task}` ({TASK_DESCRIPTIONS[task]}): {entry['n_rows']} patients predicted; "
                        f"{entry['n_patients']} labelled ({entry['n_positive']} positive, {entry['n_negative']} "
                        f"negative); {entry['n_unlabelled']} without a label (predictions only, not in the "
                        f"metrics); threshold {entry['threshold']:g}."))
    if entry["predicted_column_disagreements"]:
      blocks.append(("warning", f"{entry['predicted_column_disagreements']} rows' `predicted` column disagrees "
                                f"with probability >= {entry['threshold']:g}: the export used another threshold; "
                                "the metrics below use this threshold."))
    counts = entry["confusion"]
    blocks.append(("p", f"Confusion at the threshold: TP {counts['true_positive']}, FP {counts['false_positive']}, "
                        f"TN {counts['true_negative']}, FN {counts['false_negative']}."))
    cv = internal.get(task)
    header = ["Metric", "External (95 % CI)"]
    if cv:
      header.append("Internal CV, per repeat (95 % CI)")
    rows = []
    for metric in metrics_lib.METRIC_NAMES:
      interval = entry["ci95"][metric]
      row = [METRIC_LABELS[metric], with_interval(metric, entry["metrics"][metric], interval["low"],
                                                  interval["high"])]
      if cv:
        cv_interval = cv["pooled_ci95"][metric]
        row.append(with_interval(metric, cv["per_repeat"][metric]["mean"], cv_interval["low"],
                                 cv_interval["high"]))
      rows.append(row)
    if cv:
      for name, label in (("slope", "Calibration slope"), ("intercept", "Calibration intercept")):
        rows.append([label, _number(entry["calibration"][name]), _number(cv["calibration"][name]["mean"])])
    caption = "External metrics (rates in %)" + (", beside the internal cross-validation." if cv else ".")
    blocks.append(("table", (caption, header, rows)))
    if cv:
      cv_baselines = cv["covariate_baselines"]["covariates"]
      baseline_rows = []
      for column, item in entry["covariate_baselines"]["covariates"].items():
        auc = item["auc"]
        internal_auc = cv_baselines.get(column, {}).get("auc", {})
        baseline_rows.append([f"{column} alone", with_interval("auc", auc["estimate"], auc["low"], auc["high"]),
                              with_interval("auc", internal_auc.get("estimate"), internal_auc.get("low"),
                                            internal_auc.get("high"))])
      if baseline_rows:
        blocks.append(("table", ("Covariate baselines, external beside internal (AUC, 95 % CI).",
                                 ["Score", "External", "Internal CV"], baseline_rows)))
    drift = entry["drift"]
    blocks.append(("p", f"Inputs unlike the training data: {drift['n_flagged']} patients flagged "
                        f"({drift['n_flagged_labelled']} labelled), reported apart."))
    if drift["n_flagged"]:
      apart = [[group, str(count)] + [format_value(metric, values[metric])
                                      for metric in ("sensitivity", "specificity", "accuracy", "auc")]
               for group, count, values in (("flagged", drift["n_flagged_labelled"], drift["metrics_flagged"]),
                                            ("not flagged", drift["n_not_flagged_labelled"],
                                             drift["metrics_not_flagged"]))]
      blocks.append(("table", ("Metrics of flagged and not flagged labelled patients.",
                               ["Patients", "Labelled", "Sensitivity %", "Specificity %", "Accuracy %", "AUC"],
                               apart)))
      listed = [[item["patient_id"], "" if item["label"] is None else str(item["label"]),
                 f"{item['probability']:.3f}", str(item["predicted"]), "; ".join(item["reasons"])]
                for item in drift["patients"]]
      blocks.append(("table", ("Flagged patients.", ["Patient", "Label", "Probability", "Predicted", "Reasons"],
                               listed)))
    only = entry["predictions_only"]
    if only["n_patients"]:
      blocks.append(("p", f"Predictions only (no label): {only['n_patients']} patients, "
                          f"{only['n_predicted_positive']} predicted positive, {only['n_flagged']} flagged."))
    for column, item in entry["subgroups"].items():
      subgroup_rows = [[group["group"], str(group["n_patients"]), str(group["n_positive"]), str(group["n_negative"])]
                       + [format_value(metric, group["metrics"][metric])
                          for metric in ("accuracy", "sensitivity", "specificity", "auc")]
                       for group in item["groups"]]
      blocks.append(("table", (f"External subgroups by `{column}` ({item['rule']}).",
                               ["Group", "Patients", "Positive", "Negative", "Accuracy %", "Sensitivity %",
                                "Specificity %", "AUC"], subgroup_rows)))
    blocks.extend(clinical_blocks(entry, over_repeats=False))
    sections.append((f"{MODEL_NAMES[task]} ({TASK_DESCRIPTIONS[task]}): external validation", blocks))
  return sections


def render_external_markdown(summary: Mapping[str, Any], internal: Mapping[str, Any],
                             figure_paths: Mapping[str, str], source: str) -> str:
  parts = ["# pdx-tf external validation report", "", f"Predictions: `{source}`", ""]
  for title, blocks in external_sections(summary, internal):
    parts += [f"## {title}", ""]
    for kind, content in blocks:
      if kind == "p":
        parts += [content, ""]
      elif kind == "warning":
        parts += [f"> **{content}**", ""]
      else:
        caption, header, rows = content
        parts += [f"**{caption}**", "", _markdown_table(header, rows), ""]
  parts += ["## Figures", ""]
  for name, path in figure_paths.items():
    parts += [f"![{name}]({path})", "", EXTERNAL_FIGURE_CAPTIONS[name], ""]
  parts += ["## Methods", ""] + [f"- {note}" for note in EXTERNAL_METHODS_NOTES] + [""]
  return "\n".join(parts)


def render_external_html(summary: Mapping[str, Any], internal: Mapping[str, Any], figures: Mapping[str, bytes],
                         source: str) -> str:
  """Self-contained HTML of the external validation (inline CSS, base64 figures)."""
  parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           "<title>pdx-tf external validation report</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>pdx-tf external validation report</h1>", f"<p>Predictions: <code>{html.escape(source)}</code></p>"]
  return _html_sections_figures_methods(parts, external_sections(summary, internal), figures,
                                        EXTERNAL_FIGURE_CAPTIONS, EXTERNAL_METHODS_NOTES)
