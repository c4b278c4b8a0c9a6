"""A CLAIM 2024 / TRIPOD+AI model card (model_card.md) generated from the run metadata and the summaries.

Sources, and only these (evaluate never reads the records' dataset.json):
  run.json of every complete cell: config, preprocess, region, aggregation, seeds, code version, records hash;
  splits.json: the patient-level partition (folds, repeats, split hash);
  patients.csv: the development cohort's counts and covariates;
  the cross-validation summary (grid_statistics + clinical) and, for an external validation, its summary.
Identity is the manifest's patient_id; the card holds counts only, never a patient's values.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from pdx_tf.evaluation import metrics as metrics_lib
from pdx_tf.evaluation.grid_statistics import TaskEvaluation
from pdx_tf.evaluation.report import with_interval, format_value, METRIC_LABELS, MODEL_NAMES, TASK_DESCRIPTIONS

MODEL_CARD_FILE = "model_card.md"
CARD_METRICS = ("sensitivity", "specificity", "accuracy", "balanced_accuracy", "ppv", "npv", "auc", "brier")
NOT_RECORDED = "not recorded in run.json"


def _json(value: Any) -> str:
  return json.dumps(value, sort_keys=True)


def run_metadata(evaluation: TaskEvaluation) -> dict[str, Any]:
  """What the card says about one task's grid, read from its cells' run.json, splits.json and patients.csv.

  Returns:
    {config, preprocess, region, aggregation, aggregation_top_k, code_versions, records_hashes, init_seeds,
     split_seed, num_folds, num_repeats, n_cells, split_hash, n_patients, n_positive, covariates, consistent}:
    values of the first complete cell; `consistent` lists the run.json fields that differ between cells.
  """
  task_runs = evaluation.task_runs
  infos = [cell.run_info for _, cell in sorted(task_runs.cells.items())]
  first = infos[0]
  differing = sorted(key for key in ("config", "preprocess", "region", "aggregation", "aggregation_top_k")
                     if len({_json(info.get(key)) for info in infos}) > 1)
  seeds = [info.get("seeds", {}) for info in infos]
  labels = [int(row[f"label_{task_runs.task}"]) for row in task_runs.patients.values()]
  return {
      "config": first.get("config"),
      "preprocess": first.get("preprocess"),
      "region": first.get("region"),
      "augment": first.get("augment"),
      "aggregation": first.get("aggregation"),
      "aggregation_top_k": first.get("aggregation_top_k"),
      "code_versions": sorted({str(info.get("code_version")) for info in infos}),
      "records_hashes": sorted({str(info.get("records_hash") or info.get("dataset_hash")) for info in infos}),
      "init_seeds": sorted({seed.get("init") for seed in seeds if seed.get("init") is not None}),
      "split_seed": seeds[0].get("split"),
      "num_folds": task_runs.num_folds,
      "num_repeats": len(task_runs.repeats),
      "n_cells": len(task_runs.cells),
      "n_expected_cells": len(task_runs.expected_cells),
      "split_hash": task_runs.split_hash,
      "n_patients": len(labels),
      "n_positive": sum(labels),
      "covariates": list(task_runs.covariate_columns),
      "differing_fields": differing,
      "joint_tasks": first.get("tasks"),
      "consistency_weight": first.get("consistency_weight"),
  }


def _settings(value: Any) -> str:
  if value is None:
    return NOT_RECORDED
  if isinstance(value, Mapping):
    return "; ".join(f"{key}={_json(item)}" for key, item in sorted(value.items())) or "(none)"
  return _json(value)


def _metric_lines(metric_values: Mapping[str, Any], intervals: Mapping[str, Any]) -> list[str]:
  lines = []
  for metric in CARD_METRICS:
    interval = intervals.get(metric) or {}
    estimate = metric_values[metric]
    lines.append(f"  - {METRIC_LABELS[metric]}: "
                 f"{with_interval(metric, estimate, interval.get('low'), interval.get('high'))}"
                 + (" %" if metric not in ("auc", "brier") else ""))
  return lines


def _failure_lines(failures: Mapping[str, Any]) -> list[str]:
  lines = []
  for metric in ("sensitivity", "specificity"):
    items = failures.get(metric) or []
    if not items:
      lines.append(f"- Lowest {metric}: no subgroup with enough patients of that class.")
      continue
    shown = "; ".join(f"{item['covariate']} = {item['group']} ({item['n_patients']} patients): "
                      f"{format_value(metric, item[metric])} %" for item in items)
    lines.append(f"- Lowest {metric}: {shown}.")
  return lines


def _baseline_lines(baselines: Mapping[str, Any] | None) -> list[str]:
  if not baselines:
    return ["- Covariate baselines: none (no numeric or ordinal covariate)."]
  model = baselines["model_auc"]
  lines = [f"- Model AUC {with_interval('auc', model['estimate'], model['low'], model['high'])}."]
  for column, item in baselines["covariates"].items():
    auc = item["auc"]
    lines.append(f"- `{column}` alone ({item['kind']}, {item['n_patients']} patients): AUC "
                 f"{with_interval('auc', auc['estimate'], auc['low'], auc['high'])}.")
  if len(lines) == 1:
    lines.append("- No numeric or ordinal covariate to compare with.")
  return lines


def _decision_lines(curve: Mapping[str, Any] | None) -> list[str]:
  if not curve:
    return []
  cells = ", ".join(f"pt {row['threshold']:g}: model {format_value('auc', row['model'])} vs treat-all "
                    f"{format_value('auc', row['treat_all'])}" for row in curve["table"])
  return [f"- Decision curve (net benefit; treat-none is 0): {cells}."]


def _calibration_line(calibration: Mapping[str, Any] | None, over_repeats: bool) -> str:
  if not calibration:
    return "- Calibration: not computed."
  def value(name):
    item = calibration[name]
    return item["mean"] if over_repeats and isinstance(item, Mapping) else item
  return (f"- Calibration slope {format_value('auc', value('slope'))}, intercept "
          f"{format_value('auc', value('intercept'))}, calibration-in-the-large "
          f"{format_value('auc', value('calibration_in_the_large'))}"
          + (" (means over repeats)." if over_repeats else "."))


def render_model_card(internal: Mapping[str, TaskEvaluation], external: Mapping[str, Any] | None = None,
                      runs_dir: str = "", predictions_path: str = "") -> str:
  """The model card in markdown.

  Args:
    internal: task -> its cross-validation evaluation (clinical.extend_grid_evaluation's result); may be empty
      for an external validation without --runs_dir.
    external: task -> external summary entry, or None.
    runs_dir, predictions_path: where the inputs came from (shown as given).

  Returns:
    The markdown text, ending in a newline.
  """
  tasks = list(dict.fromkeys(list(internal) + list(external or {})))
  parts = ["# Model card (CLAIM 2024 / TRIPOD+AI)", "",
           "Generated by `python -m evaluate` from run.json, splits.json, patients.csv and the evaluation "
           "summaries; the records' dataset.json is not read.", ""]
  if runs_dir:
    parts += [f"Development runs: `{runs_dir}`", ""]
  if predictions_path:
    parts += [f"External predictions: `{predictions_path}`", ""]
  parts += ["## Intended use", "",
            "Research use: detection of peritoneal dissemination (P-Model) and small-bowel dissemination (SB-Model) "
            "in ovarian cancer from contrast CT, per patient. Not a medical device; not for clinical decisions "
            "without a prospective, site-specific validation.", ""]
  for task in tasks:
    parts += [f"## {MODEL_NAMES[task]}: {TASK_DESCRIPTIONS[task]}", ""]
    evaluation = internal.get(task)
    if evaluation is None:
      parts += ["### Development", "", "Not given: pass `--runs_dir` to describe the development data, "
                "partitions, preprocessing, augmentation and ensembling rule from the run metadata.", ""]
    else:
      parts += _development_section(evaluation)
    if external and task in external:
      parts += _external_section(external[task])
  parts += ["## Limitations", "",
            "- Cross-validation estimates come from one cohort; they are optimistic for other scanners, protocols "
            "and populations until an external validation says otherwise.",
            "- Labels are patient-level; every abdominal slice inherits its patient's label (weak labels).",
            "- Subgroup estimates rest on few patients; their CIs are wide and the failure analysis is "
            "descriptive.", ""]
  return "\n".join(parts)


def _development_section(evaluation: TaskEvaluation) -> list[str]:
  meta = run_metadata(evaluation)
  summary = evaluation.summary
  config = meta["config"] or {}
  model = config.get("model", {}) if isinstance(config, Mapping) else {}
  training = {key: config.get(key) for key in ("epochs", "batch_size", "learning_rate", "precision",
                                                "pool_fraction", "include_originals", "repartition", "seed")
              if isinstance(config, Mapping) and key in config}
  augment_text = (_settings(meta["augment"]) if meta["augment"] is not None else
                  "the augmentation parameters live in the records' dataset.json (records hash "
                  f"{', '.join(hash_[:12] for hash_ in meta['records_hashes'])}), which evaluate does not read")
  lines = ["### Data and partitions (patient level)", "",
           f"- Development cohort (patients.csv): {meta['n_patients']} patients, {meta['n_positive']} positive, "
           f"{meta['n_patients'] - meta['n_positive']} negative for `{evaluation.task_runs.task}`; covariates: "
           f"{', '.join(meta['covariates']) or 'none'}.",
           f"- Evaluated: {summary['n_patients']} patients ({summary['n_positive']} positive, "
           f"{summary['n_negative']} negative), {summary['n_slices']} slice predictions.",
           f"- Partition: patient-level {meta['num_folds']}-fold cross-validation x {meta['num_repeats']} repeats "
           f"(splits.json, split seed {meta['split_seed']}, split hash {meta['split_hash'][:12]}); every slice "
           "of a patient is in one fold. Evaluate checked that the test sets of a repeat are disjoint and that "
           "each model predicted exactly its fold's test patients.",
           f"- Models: {meta['n_cells']} of {meta['n_expected_cells']} cells complete"
           + (" (PARTIAL)." if summary["partial"] else "."),
           "", "### Model and training", "",
           f"- Model: {_settings(model)}.",
           f"- Training: {_settings(training)}.",
           *([f"- Heads: one backbone shared by tasks {', '.join(meta['joint_tasks'])} (one head each, trained together"
              f" on both labels; loss: mean cross-entropy + {meta['consistency_weight']:g} x max(0, P(sb) - P(p))^2,"
              " as small-bowel dissemination implies peritoneal dissemination)."] if meta["joint_tasks"] else []),
           f"- Initialisation seeds: {', '.join(str(seed) for seed in meta['init_seeds']) or NOT_RECORDED}.",
           f"- Code version: {', '.join(meta['code_versions'])}; records hash: "
           f"{', '.join(hash_[:12] for hash_ in meta['records_hashes'])}.",
           "", "### Preprocessing and augmentation", "",
           f"- Preprocessing: {_settings(meta['preprocess'])}.",
           f"- Region (slices read): {_settings(meta['region'])}.",
           f"- Augmentation: {augment_text}.",
           "", "### Ensembling rule", "",
           f"- Slice to patient: `{meta['aggregation']}`"
           + (f" (top_k {meta['aggregation_top_k']})" if meta["aggregation_top_k"] is not None else "") + ".",
           f"- Across models: the deployed ensemble averages the probabilities of the {meta['n_cells']} models; "
           f"a patient is positive when its probability >= {summary['threshold']:g}.",
           "- Evaluation units: each model on its own held-out fold (per cell) and each repeat's out-of-fold "
           "predictions pooled (per repeat)."]
  if meta["differing_fields"]:
    lines.append(f"- WARNING: run.json fields differ between cells: {', '.join(meta['differing_fields'])}.")
  lines += ["", "### Internal validation (cross-validation, 95 % patient-bootstrap CIs)", "",
            "- Per repeat (pooled out-of-fold), mean over repeats:"]
  lines += _metric_lines({name: summary["per_repeat"][name]["mean"] for name in metrics_lib.METRIC_NAMES},
                         summary["pooled_ci95"])
  lines += ["- Per cell (the paper's unit), mean over models:"]
  lines += _metric_lines({name: summary["per_cell"][name]["mean"] for name in metrics_lib.METRIC_NAMES},
                         summary["per_cell_ci95"])
  lines += [_calibration_line(summary.get("calibration"), over_repeats=True)]
  lines += _baseline_lines(summary.get("covariate_baselines"))
  lines += _decision_lines(summary.get("decision_curve"))
  lines += ["", "### Failure analysis by subgroup (cross-validation)", ""]
  lines += _failure_lines(summary.get("failure_analysis", {}))
  return lines + [""]


def _external_section(entry: Mapping[str, Any]) -> list[str]:
  drift = entry["drift"]
  lines = ["### External validation (95 % patient-bootstrap CIs)", "",
           f"- Cohort: {entry['n_rows']} patients predicted, {entry['n_patients']} with a label "
           f"({entry['n_positive']} positive, {entry['n_negative']} negative), {entry['n_unlabelled']} without "
           "(predictions only).",
           f"- Inputs unlike the training data (drift flags): {drift['n_flagged']} patients "
           f"({drift['n_flagged_labelled']} labelled), reported apart.",
           f"- Threshold {entry['threshold']:g}:"]
  lines += _metric_lines(entry["metrics"], entry["ci95"])
  lines += [_calibration_line(entry.get("calibration"), over_repeats=False)]
  lines += _baseline_lines(entry.get("covariate_baselines"))
  lines += _decision_lines(entry.get("decision_curve"))
  lines += ["", "### Failure analysis by subgroup (external)", ""]
  lines += _failure_lines(entry.get("failure_analysis", {}))
  return lines + [""]
