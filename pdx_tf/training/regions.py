"""The regions task (`train --task=regions`): one probability a PCI region, learned from patient-level labels.

The model (heads.REGIONS, `model.build_region_model`): the slice model with 13 sigmoid outputs on one backbone.
Every slice of a patient is trained on that patient's 13 region labels (a region is positive when its PCI
lesion-size score is > 0), as the paper trains every slice on the patient's p label; a region a surgeon did not
record (-1) is masked out of the loss (`RegionLoss`), so a patient without region labels adds nothing. A patient's
probability for region r is the grid's aggregation (default topk_mean: the mean of the k highest) over column r of
its slice scores: a per-region top-k pooling. Why this and not a region map or per-region attention:
- region labels are patient-level; nothing says which slice shows region r, so the slice model's weak supervision
  (the paper's, which works for p on this data) is the honest baseline, and top-k pooling lets the few slices
  through a region carry its score, as it does for p;
- one backbone shares what "disease" looks like across regions (13 positives-poor tasks learn from each other's
  slices), at the cost of one Dense layer;
- every part of the grid works unchanged (splits, pool draw, resume, inner validation, export, Grad-CAM), and the
  score of region r along z is evidence that can be scored against truth: the argmax slice of column r should lie
  in region r's z range (the pointing game, benchmarks/regions_benchmark.py).
Attention pooling per region (13 MIL heads) needs a trained slice model to start from and patients-as-batches;
left for when a cohort shows the top-k rule is the limit.

Flip: the records carry each image's scores as that image shows them (the data pipeline mirrors the lateral pairs,
contracts.pci_mirror, in a left-right flipped copy), so training reads the record and mirrors nothing.

p and sb read from the regions: P(p) = the largest region probability (disease anywhere), P(sb) = the largest of
regions 9-12 (`derived_scores`); each cell writes them beside its region predictions so evaluation can compare
them with the p and sb heads.

Predicted PCI (`predicted_pci`): sum over regions of P(region r) x s_r, with s_r the mean lesion-size score of
region r among the cell's TRAINING patients where it is positive (the expected score given disease there; the
mean over all regions' positives where region r has none, 1 where no training patient has any). This is the
expected PCI when each region's probability is calibrated; fitted on training patients only, from labels alone.

A cell's outputs (beside model.keras, run.json): `region_predictions.csv` (patient_id, region, label 0/1 or empty,
score 0-3 or empty: the lesion-size score behind the label, for the PCI, probability),
`region_slice_predictions.csv` (patient_id, slice_index, region, probability: each held-out slice's 13 scores),
`derived_predictions.csv` (patient_id, task p or sb, label, probability read from the regions) and metrics.json
(per-region AUC, macro AUC, thresholds). run.json holds "thresholds" (one a region: the fixed threshold, or
Youden's on the inner patients where they have both classes of that region) and "pci_scale".
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import keras
import numpy as np
from keras import ops

from pdx_tf import contracts, io_utils
from pdx_tf.contracts import NUM_PCI_REGIONS, PCI_SMALL_BOWEL_REGIONS, PCI_UNRECORDED
from pdx_tf import metrics as metrics_lib
from pdx_tf.training import aggregation as aggregation_lib, calibration as calibration_lib, region_bands

REGION_PREDICTIONS_FILE = "region_predictions.csv"
REGION_SLICE_PREDICTIONS_FILE = "region_slice_predictions.csv"
DERIVED_PREDICTIONS_FILE = "derived_predictions.csv"
DERIVED_TASKS = {"p": tuple(range(NUM_PCI_REGIONS)), "sb": PCI_SMALL_BOWEL_REGIONS}


@keras.saving.register_keras_serializable(package="pdx_tf")
class RegionLoss(keras.losses.Loss):
  """Binary cross-entropy over the recorded region labels of a batch: labels [B, 13] in {1, 0, -1}, -1 masked.

  The mean is over the recorded (sample, region) entries of the batch, so every recorded label weighs the same and
  a batch with none gives 0 (a patient without region labels trains nothing). Keras' clipping to [1e-7, 1 - 1e-7].
  """

  def call(self, y_true, y_pred):
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.clip(ops.cast(y_pred, "float32"), 1e-7, 1.0 - 1e-7)
    recorded = ops.cast(y_true >= 0.0, "float32")
    targets = ops.maximum(y_true, 0.0)
    entries = -(targets * ops.log(y_pred) + (1.0 - targets) * ops.log(1.0 - y_pred)) * recorded
    batch = ops.cast(ops.shape(y_true)[0], "float32")
    # Per sample, scaled so Keras' mean over the batch is the mean over the recorded entries.
    return ops.sum(entries, axis=-1) * batch / ops.maximum(ops.sum(recorded), 1.0)


def masked_cross_entropy(labels, probabilities) -> float:
  """`RegionLoss` in numpy (the inner loss of early stopping): mean binary cross-entropy over labels >= 0."""
  labels = np.asarray(labels, np.float64)
  probabilities = np.clip(np.asarray(probabilities, np.float64), 1e-7, 1.0 - 1e-7)
  recorded = labels >= 0
  if not recorded.any():
    return 0.0
  targets = labels[recorded]
  values = probabilities[recorded]
  return float(np.mean(-(targets * np.log(values) + (1.0 - targets) * np.log1p(-values))))


def patient_region_labels(info: contracts.DatasetInfo, patient_ids: Sequence[str]) -> np.ndarray:
  """int [P, 13]: 1 (score > 0), 0, or -1 (not recorded; all -1 for a patient without region labels)."""
  rows = []
  for patient_id in patient_ids:
    scores = info.pci_scores(patient_id)
    scores = np.full(NUM_PCI_REGIONS, PCI_UNRECORDED) if scores is None else np.asarray(scores)
    rows.append(np.where(scores < 0, -1, (scores > 0).astype(np.int64)))
  return np.asarray(rows, np.int64).reshape(len(patient_ids), NUM_PCI_REGIONS)


def patient_probabilities(slice_probabilities: np.ndarray, slice_patient_ids: np.ndarray,
                          patient_ids: Sequence[str], rule: str, top_k: int,
                          slice_indices: np.ndarray | None = None) -> np.ndarray:
  """float64 [P, 13]: each patient's region probability, the aggregation `rule` over that region's column of the
  patient's slice probabilities [N, 13]. With `slice_indices` [N] (each slice's index among its patient's
  abdominal slices, all of which are given), only the slices in the region's band count
  (region_bands.band_mask; `train --region_bands`)."""
  out = np.zeros((len(patient_ids), NUM_PCI_REGIONS), np.float64)
  for row, patient_id in enumerate(patient_ids):
    mine = slice_patient_ids == patient_id
    scores = slice_probabilities[mine]
    keep = np.ones(scores.shape, bool)
    if slice_indices is not None:
      keep = region_bands.band_mask(slice_indices[mine], int(mine.sum()))
    for region in range(NUM_PCI_REGIONS):
      out[row, region] = aggregation_lib.aggregate(scores[keep[:, region], region], rule, top_k)
  return out


def derived_scores(region_probabilities: np.ndarray) -> dict[str, np.ndarray]:
  """{"p": P(disease in any region), "sb": P(disease in any of regions 9-12)}, each the largest region probability
  of its regions, [P]."""
  region_probabilities = np.asarray(region_probabilities, np.float64)
  return {task: region_probabilities[:, list(regions)].max(axis=1) for task, regions in DERIVED_TASKS.items()}


def pci_scale(info: contracts.DatasetInfo, train_ids: Sequence[str]) -> list[float]:
  """s_r of `predicted_pci` (module docstring) from the training patients' scores."""
  scores = np.asarray([info.pci_scores(patient_id) or [PCI_UNRECORDED] * NUM_PCI_REGIONS
                       for patient_id in train_ids], np.float64).reshape(-1, NUM_PCI_REGIONS)
  positive = scores > 0
  overall = float(scores[positive].mean()) if positive.any() else 1.0
  return [float(scores[positive[:, region], region].mean()) if positive[:, region].any() else overall
          for region in range(NUM_PCI_REGIONS)]


def predicted_pci(region_probabilities: np.ndarray, scale: Sequence[float]) -> np.ndarray:
  """[P]: sum over regions of probability x scale (module docstring)."""
  return np.asarray(region_probabilities, np.float64) @ np.asarray(scale, np.float64)


def region_aucs(labels: np.ndarray, probabilities: np.ndarray) -> list[float | None]:
  """Each region's patient AUC over its recorded patients (the project's AUC, ties one half); None without both
  classes."""
  out = []
  for region in range(NUM_PCI_REGIONS):
    recorded = labels[:, region] >= 0
    value = metrics_lib.auc(labels[recorded, region], probabilities[recorded, region]) if recorded.any() else None
    out.append(None if value is None or not math.isfinite(value) else float(value))
  return out


def macro_auc(aucs: Sequence[float | None]) -> float | None:
  values = [value for value in aucs if value is not None]
  return float(np.mean(values)) if values else None


def inner_decision(rule: str, fixed: float | None, inner_fraction: float, inner_ids: Sequence[str],
                   inner_labels: np.ndarray | None, inner_probabilities: np.ndarray | None, n_slices: int,
                   scale: Sequence[float], early_stopping: Mapping[str, Any] | None) -> dict[str, Any]:
  """run.json's regions fields: "thresholds" (one a region), "threshold_rule", "calibration" (None: not fitted for
  regions), "pci_scale" and "inner_validation" (None without inner patients). With inner_youden, a region whose
  inner patients lack a class keeps 0.5 (and the record says which)."""
  thresholds, fallback = [], []
  for region in range(NUM_PCI_REGIONS):
    value = 0.5 if fixed is None else float(fixed)
    if rule == "inner_youden" and inner_labels is not None:
      recorded = inner_labels[:, region] >= 0
      if len(set(inner_labels[recorded, region].tolist())) == 2:
        value = calibration_lib.operating_threshold(rule, fixed, inner_labels[recorded, region],
                                                    inner_probabilities[recorded, region])
      else:
        fallback.append(region)
    thresholds.append(float(value))
  decision = {"thresholds": thresholds, "threshold_rule": rule, "calibration": None, "pci_scale": list(scale),
              "inner_validation": None}
  if inner_labels is not None:
    aucs = region_aucs(inner_labels, inner_probabilities)
    decision["inner_validation"] = {
        "fraction": inner_fraction, "patients": list(inner_ids),
        "region_probabilities": [[float(value) for value in row] for row in inner_probabilities],
        "n_slices": int(n_slices), "region_auc": aucs, "macro_auc": macro_auc(aucs),
        "youden_fallback_regions": fallback, "early_stopping": early_stopping}
  return decision


def write_cell_predictions(folder: str, info: contracts.DatasetInfo, test_ids: Sequence[str],
                           slice_patient_ids: np.ndarray, slice_indices: np.ndarray, slice_probabilities: np.ndarray,
                           probabilities: np.ndarray, decision: Mapping[str, Any],
                           cell: contracts.Cell, progress: Mapping[str, Any]) -> dict[str, float | None]:
  """A regions cell's region_predictions.csv, region_slice_predictions.csv, derived_predictions.csv and
  metrics.json (module docstring); returns the TensorBoard metrics. `probabilities`: [P, 13] in test_ids order."""
  labels = patient_region_labels(info, test_ids)
  scores = [info.pci_scores(patient_id) or [PCI_UNRECORDED] * NUM_PCI_REGIONS for patient_id in test_ids]
  io_utils.atomic_write_csv(
      io_utils.join(folder, REGION_PREDICTIONS_FILE), ["patient_id", "region", "label", "score", "probability"],
      [[patient_id, region, "" if labels[row, region] < 0 else int(labels[row, region]),
        "" if scores[row][region] < 0 else int(scores[row][region]), f"{probabilities[row, region]:.8f}"]
       for row, patient_id in enumerate(test_ids) for region in range(NUM_PCI_REGIONS)])
  io_utils.atomic_write_csv(
      io_utils.join(folder, REGION_SLICE_PREDICTIONS_FILE), ["patient_id", "slice_index", "region", "probability"],
      [[patient_id, int(slice_index), region, f"{slice_probabilities[row, region]:.8f}"]
       for row, (patient_id, slice_index) in enumerate(zip(slice_patient_ids, slice_indices))
       for region in range(NUM_PCI_REGIONS)])
  derived = derived_scores(probabilities)
  io_utils.atomic_write_csv(
      io_utils.join(folder, DERIVED_PREDICTIONS_FILE), ["patient_id", "task", "label", "probability"],
      [[patient_id, task, info.labels(task)[patient_id], f"{derived[task][row]:.8f}"]
       for task in DERIVED_TASKS for row, patient_id in enumerate(test_ids)])
  aucs = region_aucs(labels, probabilities)
  derived_auc = {task: _auc([info.labels(task)[patient_id] for patient_id in test_ids], derived[task])
                 for task in DERIVED_TASKS}
  metrics = {"regions/macro_auc": macro_auc(aucs), "derived/p_auc": derived_auc["p"],
             "derived/sb_auc": derived_auc["sb"]}
  document = {
      "task": contracts.PCI_TASK, "repeat": cell[0], "fold": cell[1], **metrics, "region_auc": aucs,
      "thresholds": list(decision["thresholds"]), "threshold_rule": decision["threshold_rule"],
      "num_test_patients": len(test_ids), "num_test_slices": int(slice_probabilities.shape[0]),
      "num_recorded_labels": int((labels >= 0).sum()),
      "epochs": int(progress["epochs_completed"]), "images_seen": int(progress["images_seen"]),
      "history": list(progress["history"])}
  if decision.get("inner_validation"):
    document["inner/macro_auc"] = decision["inner_validation"]["macro_auc"]
  io_utils.atomic_write_json(io_utils.join(folder, contracts.METRICS_FILE), document)
  return metrics


def _auc(labels, probabilities) -> float | None:
  value = metrics_lib.auc(np.asarray(labels), np.asarray(probabilities, np.float64))
  return None if value is None or not math.isfinite(value) else float(value)
