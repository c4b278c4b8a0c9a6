"""Evaluation of a regions grid (`train --task=regions`): where the disease is, region by region.

Reads each complete cell's region_predictions.csv, derived_predictions.csv and run.json (thresholds, pci_scale;
pdx_tf/training/regions.py) and gives, over the out-of-fold patients:
- per region: AUC with a 95 % CI (percentile bootstrap over patients), and sensitivity / specificity at the
  region's threshold (each cell's own threshold for its test patients; Youden's on the inner patients or the fixed
  one); regions without both classes have None;
- the macro AUC (the mean over regions with an AUC; its CI from the same replicates) and the small-bowel macro AUC;
- predicted vs true PCI: predicted PCI = sum over regions of probability x the cell's pci_scale (the mean score
  of a positive region among its training patients); true PCI = the sum of the recorded scores, for patients with
  all 13 recorded; Spearman's rho with a bootstrap CI and the mean absolute error;
- p and sb read from the regions (the largest region probability; the largest of 9-12) as AUCs, beside the p
  and sb heads' own AUCs when those tasks were evaluated on the same patients.
With several repeats, a patient's probability is the mean over repeats (one out-of-fold value a patient and
region, the row of E/region_predictions.csv); sensitivity and specificity are each repeat's, averaged.

summary.json "regions" keys (stable): n_patients, n_repeats, n_cells, partial, regions (a list of 13 entries:
region, name, n_recorded, n_positive, auc, auc_ci, threshold, sensitivity, specificity), macro_auc,
macro_auc_ci, small_bowel_macro_auc, pci (n_patients, spearman, spearman_ci, mae, definition), derived
({p, sb}: auc, auc_ci, head_auc).
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow as tf

from pdx_tf import contracts, io_utils, pci_map
from pdx_tf.contracts import NUM_PCI_REGIONS, PCI_REGION_NAMES, PCI_SMALL_BOWEL_REGIONS, PCI_TASK
from pdx_tf.errors import RunsError
from pdx_tf.evaluation import metrics as metrics_lib

REGION_PREDICTIONS_FILE = "region_predictions.csv"  # E's out-of-fold file; a cell's has the same name
REGION_PREDICTIONS_HEADER = ("patient_id", "region", "label", "probability")
REGION_MAP_FIGURE = "region_auc_map"
PCI_DEFINITION = ("predicted PCI = sum over regions of P(region) x the mean lesion-size score of that region among"
                  " the cell's training patients where it is positive; true PCI = the sum of the 13 recorded scores")


def find_region_grids(runs_dir: str) -> list[str]:
  """The folders below runs_dir whose splits.json is of the regions task."""
  roots = []
  if not tf.io.gfile.isdir(runs_dir):
    return roots
  for folder, _, files in tf.io.gfile.walk(runs_dir):
    if contracts.SPLITS_FILE in files:
      document = io_utils.read_json(io_utils.join(folder, contracts.SPLITS_FILE))
      if document.get("task") == PCI_TASK:
        roots.append(folder)
  return sorted(roots)


def _read_csv(path: str) -> list[dict[str, str]]:
  if not tf.io.gfile.exists(path):
    raise RunsError(f"{path} is missing although its run.json says complete; re-run that cell")
  with tf.io.gfile.GFile(path, "r") as handle:
    return list(csv.DictReader(io.StringIO(handle.read())))


def load_region_cells(root: str, allow_partial: bool = False) -> dict[str, Any]:
  """Every complete cell of the regions grid at `root`: {"cells": [{repeat, fold, thresholds, pci_scale, rows,
  derived}], "expected": number of cells, "missing": [names]}.

  Raises:
    RunsError: one line for a missing cell (without allow_partial), a test patient predicted outside its fold, or
      no complete cell.
  """
  split = io_utils.read_json(io_utils.join(root, contracts.SPLITS_FILE))
  expected = {}
  for repeat in split["repeats"]:
    for fold in repeat["folds"]:
      expected[(int(repeat["repeat"]), int(fold["fold"]))] = set(fold["test"])
  cells, missing = [], []
  for cell, test_ids in sorted(expected.items()):
    folder = contracts.cell_folder(root, cell)
    run_path = io_utils.join(folder, contracts.RUN_FILE)
    if not tf.io.gfile.exists(run_path):
      missing.append(contracts.cell_name(cell))
      continue
    run = io_utils.read_json(run_path)
    rows = _read_csv(io_utils.join(folder, REGION_PREDICTIONS_FILE))
    outside = sorted({row["patient_id"] for row in rows} - test_ids)
    if outside:
      raise RunsError(f"{folder}/{REGION_PREDICTIONS_FILE}: patient {outside[0]} is not a test patient of cell"
                      f" {contracts.cell_name(cell)} in {root}/{contracts.SPLITS_FILE}; re-run that cell")
    derived = _read_csv(io_utils.join(folder, "derived_predictions.csv"))
    cells.append({"repeat": cell[0], "fold": cell[1], "thresholds": [float(v) for v in run["thresholds"]],
                  "pci_scale": [float(v) for v in run["pci_scale"]], "rows": rows, "derived": derived})
  if missing and not allow_partial:
    raise RunsError(f"task {PCI_TASK}: {len(missing)} of {len(expected)} cells have no complete run.json below"
                    f" {root}: {', '.join(missing[:20])}; finish them or pass --allow_partial")
  if not cells:
    raise RunsError(f"task {PCI_TASK}: no complete cells below {root}; train first")
  return {"cells": cells, "expected": len(expected), "missing": missing}


def out_of_fold(loaded: Mapping[str, Any]) -> dict[str, Any]:
  """Patient-level arrays over the grid: ids [P] (sorted), labels int [P, 13] (-1 not recorded), scores int
  [P, 13], probabilities [P, 13] (mean over repeats), predicted_pci [P] (mean over repeats), derived {task:
  (labels [P], probabilities [P])}, and per repeat the decisions {repeat: (ids, decisions [p, 13])}."""
  by_patient: dict[str, dict[str, Any]] = {}
  decisions: dict[int, dict[str, np.ndarray]] = {}
  derived: dict[str, dict[str, list]] = {}
  for cell in loaded["cells"]:
    probabilities: dict[str, np.ndarray] = {}
    for row in cell["rows"]:
      entry = by_patient.setdefault(row["patient_id"], {"labels": np.full(NUM_PCI_REGIONS, -1),
                                                        "scores": np.full(NUM_PCI_REGIONS, -1), "draws": []})
      region = int(row["region"])
      entry["labels"][region] = -1 if row["label"] == "" else int(row["label"])
      entry["scores"][region] = -1 if row.get("score", "") == "" else int(row["score"])
      probabilities.setdefault(row["patient_id"], np.zeros(NUM_PCI_REGIONS))[region] = float(row["probability"])
    for patient_id, values in probabilities.items():
      by_patient[patient_id]["draws"].append((values, float(values @ np.asarray(cell["pci_scale"]))))
      decisions.setdefault(cell["repeat"], {})[patient_id] = values >= np.asarray(cell["thresholds"])
    for row in cell["derived"]:
      derived.setdefault(row["task"], {}).setdefault(row["patient_id"], [int(row["label"]), []])[1].append(
          float(row["probability"]))
  ids = sorted(by_patient)
  return {
      "ids": ids,
      "labels": np.asarray([by_patient[p]["labels"] for p in ids], np.int64).reshape(-1, NUM_PCI_REGIONS),
      "scores": np.asarray([by_patient[p]["scores"] for p in ids], np.int64).reshape(-1, NUM_PCI_REGIONS),
      "probabilities": np.asarray([np.mean([d[0] for d in by_patient[p]["draws"]], axis=0) for p in ids]
                                  ).reshape(-1, NUM_PCI_REGIONS),
      "predicted_pci": np.asarray([np.mean([d[1] for d in by_patient[p]["draws"]]) for p in ids]),
      "derived": {task: (np.asarray([values[p][0] for p in ids]), np.asarray([np.mean(values[p][1]) for p in ids]))
                  for task, values in derived.items()},
      "decisions": {repeat: (sorted(values), np.asarray([values[p] for p in sorted(values)]))
                    for repeat, values in decisions.items()},
  }


def _auc(labels, probabilities) -> float | None:
  labels = np.asarray(labels)
  if labels.size == 0 or len(set(labels.tolist())) < 2:
    return None
  value = metrics_lib.binary_metrics(labels, np.asarray(probabilities, np.float64))["auc"]
  return None if value is None or not math.isfinite(value) else float(value)


def region_aucs(labels: np.ndarray, probabilities: np.ndarray) -> list[float | None]:
  return [_auc(labels[labels[:, r] >= 0, r], probabilities[labels[:, r] >= 0, r]) for r in range(NUM_PCI_REGIONS)]


def _macro(values: Sequence[float | None]) -> float | None:
  present = [value for value in values if value is not None]
  return float(np.mean(present)) if present else None


def _spearman(x, y) -> float | None:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return None
  from scipy import stats  # pylint: disable=import-outside-toplevel  (scipy comes with scikit-learn)
  return float(stats.spearmanr(x, y).statistic)


def _ci(values: Sequence[float | None]) -> list[float] | None:
  present = np.asarray([value for value in values if value is not None], np.float64)
  if present.size < 10:
    return None
  return [float(np.percentile(present, 2.5)), float(np.percentile(present, 97.5))]


def evaluate_regions(root: str, *, num_bootstrap: int = 1000, seed: int = 0, allow_partial: bool = False,
                     head_scores: Mapping[str, Mapping[str, float]] | None = None
                     ) -> tuple[dict[str, Any], list[list[Any]]]:
  """(summary["regions"], the rows of E/region_predictions.csv) of the regions grid at `root` (module docstring).

  `head_scores`: {"p": {patient_id: probability}, "sb": ...} of the p and sb heads (out-of-fold, mean over
  repeats) to compare with the scores read from the regions; their AUC is taken on the patients both have.
  The bootstrap resamples patients (by patient ID, keyed by `seed`).
  """
  loaded = load_region_cells(root, allow_partial)
  data = out_of_fold(loaded)
  ids, labels, probabilities = data["ids"], data["labels"], data["probabilities"]
  aucs = region_aucs(labels, probabilities)
  complete = (data["scores"] >= 0).all(axis=1)
  true_pci = data["scores"].clip(min=0).sum(axis=1)
  rng = np.random.default_rng([seed, 0x9C1])
  replicate_aucs, replicate_macro, replicate_rho = [], [], []
  derived_replicates: dict[str, list] = {task: [] for task in data["derived"]}
  for _ in range(num_bootstrap):
    draw = rng.integers(0, len(ids), len(ids))
    region_values = region_aucs(labels[draw], probabilities[draw])
    replicate_aucs.append(region_values)
    replicate_macro.append(_macro(region_values))
    chosen = draw[complete[draw]]
    replicate_rho.append(_spearman(data["predicted_pci"][chosen], true_pci[chosen]) if chosen.size else None)
    for task, (task_labels, task_probabilities) in data["derived"].items():
      derived_replicates[task].append(_auc(task_labels[draw], task_probabilities[draw]))
  entries = []
  for region in range(NUM_PCI_REGIONS):
    recorded = labels[:, region] >= 0
    sensitivity, specificity = [], []
    for repeat_ids, decisions in data["decisions"].values():
      rows = np.asarray([ids.index(p) for p in repeat_ids])
      region_labels = labels[rows, region]
      if (region_labels == 1).any():
        sensitivity.append(float(decisions[region_labels == 1, region].mean()))
      if (region_labels == 0).any():
        specificity.append(float(1.0 - decisions[region_labels == 0, region].mean()))
    thresholds = [cell["thresholds"][region] for cell in loaded["cells"]]
    entries.append({
        "region": region, "name": PCI_REGION_NAMES[region], "n_recorded": int(recorded.sum()),
        "n_positive": int((labels[:, region] == 1).sum()), "auc": aucs[region],
        "auc_ci": _ci([values[region] for values in replicate_aucs]),
        "threshold": float(np.mean(thresholds)),
        "sensitivity": float(np.mean(sensitivity)) if sensitivity else None,
        "specificity": float(np.mean(specificity)) if specificity else None})
  head_scores = head_scores or {}
  derived = {}
  for task, (task_labels, task_probabilities) in data["derived"].items():
    head = head_scores.get(task)
    shared = [position for position, p in enumerate(ids) if head and p in head]
    derived[task] = {
        "auc": _auc(task_labels, task_probabilities), "auc_ci": _ci(derived_replicates[task]),
        "head_auc": _auc(task_labels[shared], [head[ids[position]] for position in shared]) if shared else None,
        "head_n_patients": len(shared)}
  summary = {
      "n_patients": len(ids), "n_repeats": len(data["decisions"]), "n_cells": len(loaded["cells"]),
      "partial": bool(loaded["missing"]), "regions": entries, "macro_auc": _macro(aucs),
      "macro_auc_ci": _ci(replicate_macro),
      "small_bowel_macro_auc": _macro([aucs[region] for region in PCI_SMALL_BOWEL_REGIONS]),
      "pci": {"n_patients": int(complete.sum()),
              "spearman": _spearman(data["predicted_pci"][complete], true_pci[complete]),
              "spearman_ci": _ci(replicate_rho),
              "mae": float(np.mean(np.abs(data["predicted_pci"][complete] - true_pci[complete])))
              if complete.any() else None,
              "definition": PCI_DEFINITION},
      "derived": derived}
  rows = [[patient_id, region, "" if labels[position, region] < 0 else int(labels[position, region]),
           repr(float(probabilities[position, region]))]
          for position, patient_id in enumerate(ids) for region in range(NUM_PCI_REGIONS)]
  return summary, rows


def markdown_section(summary: Mapping[str, Any], figure_path: str | None) -> str:
  """The report's regions section (markdown)."""
  def number(value):
    return "n/a" if value is None else f"{value:.3f}"

  def interval(values):
    return "" if not values else f" ({values[0]:.3f}-{values[1]:.3f})"

  lines = ["## Regions (PCI)", "",
           f"{summary['n_patients']} patients, {summary['n_cells']} cells, {summary['n_repeats']} repeat(s)"
           f"{' (partial)' if summary['partial'] else ''}. Macro AUC {number(summary['macro_auc'])}"
           f"{interval(summary['macro_auc_ci'])}; small-bowel regions (9-12)"
           f" {number(summary['small_bowel_macro_auc'])}.",
           ""]
  if figure_path:
    lines += [f"![AUC by region]({figure_path})", ""]
  lines += ["| Region | Name | Recorded | Positive | AUC (95 % CI) | Threshold | Sensitivity | Specificity |",
            "|---|---|---|---|---|---|---|---|"]
  for entry in summary["regions"]:
    lines.append(f"| {entry['region']} | {entry['name']} | {entry['n_recorded']} | {entry['n_positive']} |"
                 f" {number(entry['auc'])}{interval(entry['auc_ci'])} | {entry['threshold']:.3f} |"
                 f" {number(entry['sensitivity'])} | {number(entry['specificity'])} |")
  pci = summary["pci"]
  lines += ["", f"PCI ({pci['n_patients']} patients with all 13 regions recorded): Spearman"
            f" {number(pci['spearman'])}{interval(pci['spearman_ci'])}, mean absolute error {number(pci['mae'])}."
            f" {pci['definition']}.", ""]
  for task, entry in summary["derived"].items():
    lines.append(f"- {task} read from the regions: AUC {number(entry['auc'])}{interval(entry['auc_ci'])}"
                 + (f"; the {task} head on the same {entry['head_n_patients']} patients: {number(entry['head_auc'])}"
                    if entry["head_auc"] is not None else f"; no {task} head evaluated beside it"))
  return "\n".join(lines) + "\n"


def write_outputs(output_dir: str, summary: Mapping[str, Any], rows: Sequence[Sequence[Any]],
                  figures_folder: str) -> str:
  """Writes E/region_predictions.csv and the AUC map figure; returns the figure's path relative to output_dir."""
  io_utils.atomic_write_csv(io_utils.join(output_dir, REGION_PREDICTIONS_FILE), REGION_PREDICTIONS_HEADER, rows)
  relative = f"{figures_folder}/{REGION_MAP_FIGURE}.png"
  io_utils.atomic_write_bytes(io_utils.join(output_dir, relative),
                              pci_map.region_map_png([entry["auc"] for entry in summary["regions"]],
                                             f"AUC by PCI region (macro {summary['macro_auc'] or float('nan'):.2f})"))
  return relative


def head_scores_from_runs(task_runs: Mapping[str, Any]) -> dict[str, dict[str, float]]:
  """{task: {patient_id: mean out-of-fold probability over repeats}} of evaluated p / sb grids (runs.TaskRuns)."""
  out = {}
  for task, runs in task_runs.items():
    values: dict[str, list[float]] = {}
    for cell in runs.cells.values():
      for patient_id, probability in zip(cell.patient_ids, cell.patient_probabilities.tolist()):
        values.setdefault(patient_id, []).append(probability)
    out[task] = {patient_id: float(np.mean(draws)) for patient_id, draws in values.items()}
  return out
